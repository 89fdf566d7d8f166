//! The baseline formats q8_0, q4_0 and kivi2 against references written here from their
//! definitions (ggml's reference quantizers, KIVI's min-max), bit for bit.

use half::f16;
use kvbits::Error;
use kvbits::kv::{FormatId, HEAD_DIMS, QuantParams, Role, Shape};
use kvbits::rng::{Rng, rel_err};

mod common;
use common::kv_data;

const NS: [usize; 6] = [1, 7, 32, 33, 128, 300];

fn h(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn push_f16(bytes: &mut Vec<u8>, v: f32) {
    bytes.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Stored bytes and decoded values, computed from the definitions.
type Reference = (Vec<u8>, Vec<f32>);
type RefFn = fn(&[f32], Shape) -> Reference;

/// ggml's `quantize_row_q8_0_ref` on each token row, groups of 32 (a last group of 16).
fn ref_q8_0(x: &[f32], s: Shape) -> Reference {
    let (mut bytes, mut vals) = (Vec::new(), Vec::new());
    for row in x.chunks(s.d) {
        for g in row.chunks(32) {
            let mut amax = 0f32;
            for &v in g {
                if v.abs() > amax {
                    amax = v.abs();
                }
            }
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            push_f16(&mut bytes, d);
            for &v in g {
                let q = (v * id).round() as i8;
                bytes.push(q as u8);
                vals.push(q as f32 * h(d));
            }
        }
    }
    (bytes, vals)
}

/// ggml's `quantize_row_q4_0_ref` on each token row, groups of 32 (a last group of 16).
fn ref_q4_0(x: &[f32], s: Shape) -> Reference {
    let (mut bytes, mut vals) = (Vec::new(), Vec::new());
    for row in x.chunks(s.d) {
        for g in row.chunks(32) {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in g {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            push_f16(&mut bytes, d);
            let half = g.len() / 2;
            let q: Vec<u8> = g
                .iter()
                .map(|&v| ((v * id + 8.5).trunc() as i32).min(15) as u8)
                .collect();
            for j in 0..half {
                bytes.push(q[j] | (q[j + half] << 4));
            }
            vals.extend(q.iter().map(|&c| (c as i32 - 8) as f32 * h(d)));
        }
    }
    (bytes, vals)
}

/// KIVI min-max over `vals`: stored (min, step) and codes.
fn ref_minmax(vals: &[f32]) -> (f32, f32, Vec<u8>) {
    let mn = vals.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let mx = vals.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let (lo, step) = (h(mn), h((mx - mn) / 3.0));
    let codes = vals
        .iter()
        .map(|&v| {
            if step > 0.0 {
                ((v - lo) / step).clamp(0.0, 3.0).round() as u8
            } else {
                0
            }
        })
        .collect();
    (lo, step, codes)
}

/// 2-bit codes, four per byte, first in the low bits.
fn pack2(codes: &[u8], bytes: &mut Vec<u8>) {
    for four in codes.chunks(4) {
        bytes.push(
            four.iter()
                .enumerate()
                .fold(0, |b, (k, &c)| b | c << (2 * k)),
        );
    }
}

/// KIVI keys: per channel over groups of 32 tokens; min[d], step[d], codes token-major.
fn ref_kivi2_keys(x: &[f32], s: Shape) -> Reference {
    let d = s.d;
    let (mut bytes, mut vals) = (Vec::new(), vec![0f32; x.len()]);
    for t0 in (0..s.n).step_by(32) {
        let m = 32.min(s.n - t0);
        let mut codes = vec![0u8; m * d];
        let mut params = Vec::new();
        for c in 0..d {
            let col: Vec<f32> = (0..m).map(|i| x[(t0 + i) * d + c]).collect();
            let (lo, step, q) = ref_minmax(&col);
            for i in 0..m {
                codes[i * d + c] = q[i];
                vals[(t0 + i) * d + c] = q[i] as f32 * step + lo;
            }
            params.push((lo, step));
        }
        params.iter().for_each(|p| push_f16(&mut bytes, p.0));
        params.iter().for_each(|p| push_f16(&mut bytes, p.1));
        pack2(&codes, &mut bytes);
    }
    (bytes, vals)
}

/// KIVI values: per token over groups of 32 channels; each group min, step, codes.
fn ref_kivi2_values(x: &[f32], s: Shape) -> Reference {
    let (mut bytes, mut vals) = (Vec::new(), Vec::new());
    for row in x.chunks(s.d) {
        for g in row.chunks(32) {
            let (lo, step, q) = ref_minmax(g);
            push_f16(&mut bytes, lo);
            push_f16(&mut bytes, step);
            pack2(&q, &mut bytes);
            vals.extend(q.iter().map(|&c| c as f32 * step + lo));
        }
    }
    (bytes, vals)
}

/// Quantize `x` behind a prefix (appending, not overwriting), compare bytes and decoded
/// values with the reference, then scores and accumulate with the decoded values.
fn check_block(f: FormatId, shape: Shape, x: &[f32], reference: RefFn, rng: &mut Rng) {
    let imp = f.imp();
    let ctx = format!("{f} {shape:?}");
    let mut out = vec![0xA5u8; 3];
    imp.quantize(x, shape, &[], &QuantParams::default(), &mut out)
        .unwrap();
    assert_eq!(out[..3], [0xA5; 3], "{ctx}: prefix overwritten");
    let block = &out[3..];
    assert_eq!(
        block.len(),
        imp.block_size(shape, 0, &QuantParams::default()).total(),
        "{ctx}: size"
    );
    let (want_bytes, want_vals) = reference(x, shape);
    assert_eq!(block, &want_bytes[..], "{ctx}: stored bytes");

    let (n, d) = (shape.n, shape.d);
    let mut deq = vec![f32::NAN; n * d];
    imp.dequantize(block, shape, &mut deq);
    for (i, (a, b)) in deq.iter().zip(&want_vals).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{ctx}: value {i}: {a} vs {b}");
    }

    let q = rng.normals(d);
    let mut got = vec![f32::NAN; n];
    imp.scores(block, shape, &q, &mut got);
    // One dot can cancel to near zero (n = 1 is a single dot), so the error is taken
    // relative to the size of the terms, Σ_c |q_c·x̂_c|, not to the result.
    let (mut err2, mut mag2) = (0f64, 0f64);
    for (r, &g) in deq.chunks(d).zip(&got) {
        let terms = r.iter().zip(&q).map(|(&a, &b)| a as f64 * b as f64);
        err2 += (g as f64 - terms.clone().sum::<f64>()).powi(2);
        mag2 += terms.map(f64::abs).sum::<f64>().powi(2);
    }
    let e = (err2 / mag2.max(f64::MIN_POSITIVE)).sqrt();
    assert!(e < 1e-5, "{ctx}: scores rel. error {e}");

    let p: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    let init = rng.normals(d);
    let mut want = vec![0f64; d];
    for (row, &pt) in deq.chunks(d).zip(&p) {
        for (w, &v) in want.iter_mut().zip(row) {
            *w += pt as f64 * v as f64;
        }
    }
    let want: Vec<f32> = want
        .iter()
        .zip(&init)
        .map(|(&w, &i)| (w + i as f64) as f32)
        .collect();
    let mut got = init.clone();
    imp.accumulate(block, shape, &p, &mut got);
    let e = rel_err(&got, &want);
    assert!(e < 1e-5, "{ctx}: accumulate rel. error {e}");
}

// q8_0 and q4_0 treat keys and values alike; they run with both roles all the same.
const CASES: [(FormatId, Role, RefFn); 6] = [
    (FormatId::Q8_0, Role::Key, ref_q8_0),
    (FormatId::Q8_0, Role::Value, ref_q8_0),
    (FormatId::Q4_0, Role::Key, ref_q4_0),
    (FormatId::Q4_0, Role::Value, ref_q4_0),
    (FormatId::Kivi2, Role::Key, ref_kivi2_keys),
    (FormatId::Kivi2, Role::Value, ref_kivi2_values),
];

#[test]
fn random_blocks_match_reference() {
    let seed = Rng::fresh_seed();
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    for (f, role, reference) in CASES {
        for d in HEAD_DIMS {
            for n in NS {
                let x = kv_data(&mut rng, n, d);
                check_block(f, Shape { n, d, role }, &x, reference, &mut rng);
            }
        }
    }
}

#[test]
fn storage_size_and_bits() {
    for (f, bits, code_bits) in [
        (FormatId::Q8_0, 8.5, 8),
        (FormatId::Q4_0, 4.5, 4),
        (FormatId::Kivi2, 3.0, 2),
    ] {
        for role in [Role::Key, Role::Value] {
            assert_eq!(f.bits_per_value(128, role, 128), bits, "{f} {role:?}");
            for d in HEAD_DIMS {
                for n in NS {
                    let shape = Shape { n, d, role };
                    let size = f.imp().block_size(shape, 0, &QuantParams::default());
                    assert_eq!(size.codes * 8, n * d * code_bits, "{f} {shape:?}");
                    let mut out = Vec::new();
                    let x = vec![1.5f32; n * d];
                    f.imp()
                        .quantize(&x, shape, &[], &QuantParams::default(), &mut out)
                        .unwrap();
                    assert_eq!(out.len(), size.total(), "{f} {shape:?}");
                }
            }
        }
    }
    // A partial last key group of KIVI carries a full group's min and step.
    let shape = Shape {
        n: 33,
        d: 128,
        role: Role::Key,
    };
    assert_eq!(
        FormatId::Kivi2
            .imp()
            .block_size(shape, 0, &QuantParams::default())
            .meta,
        2 * 128 * 4
    );
}

#[test]
fn edge_cases_match_reference() {
    let seed = Rng::fresh_seed();
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    for (f, role, reference) in CASES {
        for d in [64, 80] {
            for n in [1, 33] {
                let shape = Shape { n, d, role };
                // One constant channel, then one constant token.
                let mut x = kv_data(&mut rng, n, d);
                let c0 = rng.below(d);
                (0..n).for_each(|t| x[t * d + c0] = -2.75);
                let t0 = rng.below(n);
                x[t0 * d..(t0 + 1) * d].fill(0.3);
                check_block(f, shape, &x, reference, &mut rng);
                check_block(f, shape, &vec![0.0; n * d], reference, &mut rng);
            }
        }
    }
}

#[test]
fn zeros_decode_to_zero() {
    for (f, role, _) in CASES {
        let shape = Shape { n: 7, d: 96, role };
        let mut out = Vec::new();
        let imp = f.imp();
        imp.quantize(
            &[0.0; 7 * 96],
            shape,
            &[],
            &QuantParams::default(),
            &mut out,
        )
        .unwrap();
        let mut deq = vec![1.0f32; 7 * 96];
        imp.dequantize(&out, shape, &mut deq);
        assert!(deq.iter().all(|&v| v == 0.0), "{f} {role:?}");
        let mut s = vec![1.0f32; 7];
        imp.scores(&out, shape, &[1.0; 96], &mut s);
        assert!(s.iter().all(|&v| v == 0.0), "{f} {role:?}");
    }
}

#[test]
fn kivi2_single_token_and_constant_channel_are_exact_in_f16() {
    let seed = Rng::fresh_seed();
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    let imp = FormatId::Kivi2.imp();
    // One token: every key channel's range is a point; values of a constant group too.
    let x = rng.normals(128);
    for (role, input) in [(Role::Key, x.clone()), (Role::Value, vec![0.7; 128])] {
        let shape = Shape { n: 1, d: 128, role };
        let mut out = Vec::new();
        imp.quantize(&input, shape, &[], &QuantParams::default(), &mut out)
            .unwrap();
        let mut deq = vec![0f32; 128];
        imp.dequantize(&out, shape, &mut deq);
        for (a, &b) in deq.iter().zip(&input) {
            assert_eq!(*a, h(b), "{role:?}");
        }
    }
}

#[test]
fn bad_input_is_an_error_and_appends_nothing() {
    let params = QuantParams::default();
    for f in [FormatId::Q8_0, FormatId::Q4_0, FormatId::Kivi2] {
        for role in [Role::Key, Role::Value] {
            let shape = Shape { n: 40, d: 80, role };
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = vec![0.5f32; 40 * 80];
                x[37 * 80 + 11] = bad;
                let mut out = vec![7u8];
                match f.imp().quantize(&x, shape, &[], &params, &mut out) {
                    Err(Error::NonFinite { token, channel }) => {
                        assert_eq!((token, channel), (37, 11), "{f}")
                    }
                    r => panic!("{f} {role:?} {bad}: {r:?}"),
                }
                assert_eq!(out, [7], "{f}");
            }
            // Finite but beyond the f16 range of the cache: an error, not infinity.
            let mut x = vec![0.5f32; 40 * 80];
            x[35 * 80..36 * 80].fill(1e7);
            let mut out = vec![7u8];
            let r = f.imp().quantize(&x, shape, &[], &params, &mut out);
            assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "{f} {role:?}: {r:?}"
            );
            assert_eq!(out, [7], "{f}");
            // A head dim outside the table, and a wrong length.
            let s = Shape { d: 100, ..shape };
            assert!(
                f.imp()
                    .quantize(&[0.0; 4000], s, &[], &params, &mut out)
                    .is_err()
            );
            assert!(
                f.imp()
                    .quantize(&x[1..], shape, &[], &params, &mut out)
                    .is_err()
            );
        }
    }
}

/// Quantize one row of 64 channels (two ggml groups) with `f`.
fn one_row(f: FormatId, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let shape = Shape {
        n: 1,
        d: 64,
        role: Role::Key,
    };
    let mut out = Vec::new();
    f.imp()
        .quantize(x, shape, &[], &QuantParams::default(), &mut out)
        .unwrap();
    let mut deq = vec![0f32; 64];
    f.imp().dequantize(&out, shape, &mut deq);
    (out, deq)
}

#[test]
fn q8_0_hand_worked() {
    // Group 0: amax 127, so d = 1 (f16 0x3C00) and codes are round-half-away of x.
    // Group 1: amax 1, d = 1/127; f16(1/127) = 2^-7·(1 + 8/1024) = 0x2008, but the codes
    // use the f32 inverse: 0.791315·127 = 100.497 → 100 (the f16 inverse, 127.0078, gives 101).
    let mut x = [0f32; 64];
    x[..7].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.49, -127.0]);
    x[32] = 1.0;
    x[33] = 0.791315;
    let (bytes, deq) = one_row(FormatId::Q8_0, &x);
    let mut want = vec![0x00, 0x3C, 127, 3, 0xFD, 1, 0xFF, 1, 0x81];
    want.resize(34, 0);
    want.extend([0x08, 0x20, 127, 100]);
    want.resize(68, 0);
    assert_eq!(bytes, want);
    assert_eq!(deq[..7], [127.0, 3.0, -3.0, 1.0, -1.0, 1.0, -127.0]);
    assert_eq!(deq[33], 100.0 * (2f32.powi(-7) + 2f32.powi(-14)));
}

#[test]
fn q4_0_hand_worked() {
    // Group 0: the largest magnitude is -8, so d = -8/-8 = 1 (0x3C00) and
    // code = min(15, trunc(x + 8.5)): -8 → 0, 7 → 15, 7.6 → 16 → 15, 0 → 8, -0.5 → 8,
    // 0.5 → 9, -0.6 → 7, 3.2 → 11, 4.5 → 13, -4.5 → 4.
    // Group 1: 8 and -8 tie; the first (8) wins, d = -1 (0xBC00): 8 → 0 (value 8),
    // -7.6 → 15 (value -7), -8 → 16.5 → 15 (value -7).
    let mut x = [0f32; 64];
    x[..8].copy_from_slice(&[-8.0, 7.0, 7.6, 0.0, -0.5, 0.5, -0.6, 3.2]);
    x[16] = 4.5;
    x[17] = -4.5;
    x[32..35].copy_from_slice(&[8.0, -7.6, -8.0]);
    let (bytes, deq) = one_row(FormatId::Q4_0, &x);
    let mut want = vec![0x00, 0x3C, 0xD0, 0x4F, 0x8F, 0x88, 0x88, 0x89, 0x87, 0x8B];
    want.resize(18, 0x88);
    want.extend([0x00, 0xBC, 0x80, 0x8F, 0x8F]);
    want.resize(36, 0x88);
    assert_eq!(bytes, want);
    assert_eq!(deq[..8], [-8.0, 7.0, 7.0, 0.0, 0.0, 1.0, -1.0, 3.0]);
    assert_eq!(deq[16..18], [5.0, -4.0]);
    assert_eq!(deq[32..35], [8.0, -7.0, -7.0]);
}
