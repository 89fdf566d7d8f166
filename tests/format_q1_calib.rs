//! q1_calib (CalibQuant 1-bit) against a reference written here from its definition.

use half::f16;
use kvbits::Error;
use kvbits::kv::{FormatId, HEAD_DIMS, QuantParams, Role, Shape};
use kvbits::rng::{Rng, rel_err};

fn h(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn alpha(p: &QuantParams, role: Role) -> f32 {
    match role {
        Role::Key => p.calib_alpha_k,
        Role::Value => p.calib_alpha_v,
    }
}

/// Stored bytes and decoded values from the definition: per channel lo = f16(α·min),
/// hi = f16(α·max); bit = x > (lo + hi) / 2; x̂ = lo + bit·(hi − lo).
fn reference(x: &[f32], s: Shape, p: &QuantParams) -> (Vec<u8>, Vec<f32>) {
    let (n, d) = (s.n, s.d);
    let a = alpha(p, s.role);
    let mut bytes = vec![0u8; 4 * d + n * d / 8];
    let mut vals = vec![0f32; n * d];
    for c in 0..d {
        let mut mn = x[c];
        let mut mx = x[c];
        for t in 1..n {
            mn = mn.min(x[t * d + c]);
            mx = mx.max(x[t * d + c]);
        }
        let (lo, hi) = (h(a * mn), h(a * mx));
        bytes[2 * c..2 * c + 2].copy_from_slice(&f16::from_f32(lo).to_le_bytes());
        bytes[2 * (d + c)..2 * (d + c) + 2].copy_from_slice(&f16::from_f32(hi).to_le_bytes());
        for t in 0..n {
            let bit = x[t * d + c] > (lo + hi) / 2.0;
            bytes[4 * d + t * d / 8 + c / 8] |= u8::from(bit) << (c % 8);
            vals[t * d + c] = lo + (bit as u8) as f32 * (hi - lo);
        }
    }
    (bytes, vals)
}

/// Quantize, compare with the reference bit for bit, and check scores and accumulate
/// against the decoded values. Returns the decoded block.
fn check(x: &[f32], shape: Shape, p: &QuantParams, rng: &mut Rng) -> Vec<f32> {
    let imp = FormatId::Q1Calib.imp();
    let mut out = vec![0x5Au8; 5];
    imp.quantize(x, shape, &[], p, &mut out).unwrap();
    assert_eq!(out[..5], [0x5A; 5], "{shape:?}: prefix overwritten");
    let block = &out[5..];
    assert_eq!(
        block.len(),
        imp.block_size(shape, 0, &QuantParams::default()).total(),
        "{shape:?}"
    );
    let (bytes, vals) = reference(x, shape, p);
    assert_eq!(block, &bytes[..], "{shape:?}: stored bytes");
    let (n, d) = (shape.n, shape.d);
    let mut deq = vec![f32::NAN; n * d];
    imp.dequantize(block, shape, &mut deq);
    let same = deq
        .iter()
        .zip(&vals)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{shape:?}: decoded values differ");

    let q = rng.normals(d);
    let mut got = vec![f32::NAN; n];
    imp.scores(block, shape, &q, &mut got);
    // Error relative to Σ_c |q_c·x̂_c|, as a lone dot (n = 1) can cancel to near zero.
    let (mut err2, mut mag2) = (0f64, 0f64);
    for t in 0..n {
        let (mut dot, mut mag) = (0f64, 0f64);
        for c in 0..d {
            let term = q[c] as f64 * vals[t * d + c] as f64;
            dot += term;
            mag += term.abs();
        }
        err2 += (got[t] as f64 - dot).powi(2);
        mag2 += mag * mag;
    }
    let e = (err2 / mag2.max(f64::MIN_POSITIVE)).sqrt();
    assert!(e < 1e-5, "{shape:?}: scores rel. error {e}");

    // Softmax-like weights, added onto a non-zero output.
    let pw: Vec<f32> = (0..n).map(|_| rng.uniform() / n as f32).collect();
    let mut got = rng.normals(d);
    let want: Vec<f32> = (0..d)
        .map(|c| {
            let s: f64 = (0..n).map(|t| pw[t] as f64 * vals[t * d + c] as f64).sum();
            (got[c] as f64 + s) as f32
        })
        .collect();
    imp.accumulate(block, shape, &pw, &mut got);
    let e = rel_err(&got, &want);
    assert!(e < 1e-5, "{shape:?}: accumulate rel. error {e}");
    deq
}

#[test]
fn random_blocks_match_reference() {
    let seed = Rng::fresh_seed();
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    let tuned = QuantParams {
        calib_alpha_k: 0.2 + 0.8 * rng.uniform(),
        calib_alpha_v: 0.2 + 0.8 * rng.uniform(),
        ..QuantParams::default()
    };
    for p in [QuantParams::default(), tuned] {
        for role in [Role::Key, Role::Value] {
            for d in HEAD_DIMS {
                for n in [1, 7, 32, 33, 128, 300] {
                    // Channels with their own offset and spread, as keys have.
                    let off: Vec<f32> = (0..d).map(|_| 2.0 * rng.normal()).collect();
                    let x: Vec<f32> = (0..n * d)
                        .map(|i| off[i % d] + (1 + i % 3) as f32 * rng.normal())
                        .collect();
                    check(&x, Shape { n, d, role }, &p, &mut rng);
                }
            }
        }
    }
}

#[test]
fn storage_size_and_bits() {
    for role in [Role::Key, Role::Value] {
        assert_eq!(FormatId::Q1Calib.bits_per_value(128, role, 128), 1.25);
        for d in HEAD_DIMS {
            for n in [1, 33, 300] {
                let size = FormatId::Q1Calib.imp().block_size(
                    Shape { n, d, role },
                    0,
                    &QuantParams::default(),
                );
                // One bit per value; the range of every channel once per block.
                assert_eq!(size.codes * 8, n * d);
                assert_eq!(size.meta, 2 * 2 * d);
            }
        }
    }
}

#[test]
fn edge_cases() {
    let seed = Rng::fresh_seed();
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    let p = QuantParams::default();
    for role in [Role::Key, Role::Value] {
        let a = alpha(&p, role);
        for d in [64, 112] {
            // A constant channel decodes to f16(α·value) on every token, whatever the sign.
            let n = 33;
            let mut x = rng.normals(n * d);
            let (cp, cn) = (rng.below(d / 2), d / 2 + rng.below(d / 2));
            (0..n).for_each(|t| {
                x[t * d + cp] = 1.7;
                x[t * d + cn] = -3.1;
            });
            let deq = check(&x, Shape { n, d, role }, &p, &mut rng);
            for t in 0..n {
                assert_eq!(deq[t * d + cp], h(a * 1.7));
                assert_eq!(deq[t * d + cn], h(a * -3.1));
            }
            // All zeros decode to zeros.
            let deq = check(&vec![0.0; n * d], Shape { n, d, role }, &p, &mut rng);
            assert!(deq.iter().all(|&v| v == 0.0));
            // One token: every channel's range is a point.
            let x = rng.normals(d);
            let deq = check(&x, Shape { n: 1, d, role }, &p, &mut rng);
            for (v, &xv) in deq.iter().zip(&x) {
                assert_eq!(*v, h(a * xv));
            }
        }
    }
}

#[test]
fn hand_worked_block() {
    // α = 0.5, two tokens. Channel 0: {4, -2} → lo -1, hi 2, mid 0.5: bits 1, 0.
    // Channel 1: {1, 3} → lo 0.5, hi 1.5, mid 1: 1 is not above it, bits 0, 1.
    // Channel 9: {5, 1} → lo 0.5, hi 2.5, mid 1.5: bits 1, 0 (byte 1, bit 1).
    let d = 64;
    let mut x = vec![0f32; 2 * d];
    for (c, a, b) in [(0, 4.0, -2.0), (1, 1.0, 3.0), (9, 5.0, 1.0)] {
        x[c] = a;
        x[d + c] = b;
    }
    let p = QuantParams {
        calib_alpha_v: 0.5,
        ..QuantParams::default()
    };
    let shape = Shape {
        n: 2,
        d,
        role: Role::Value,
    };
    let mut out = Vec::new();
    FormatId::Q1Calib
        .imp()
        .quantize(&x, shape, &[], &p, &mut out)
        .unwrap();
    let mut want = vec![0u8; 4 * d + 16];
    want[..4].copy_from_slice(&[0x00, 0xBC, 0x00, 0x38]); // lo[0] = -1, lo[1] = 0.5
    want[18..20].copy_from_slice(&[0x00, 0x38]); // lo[9] = 0.5
    want[2 * d..2 * d + 4].copy_from_slice(&[0x00, 0x40, 0x00, 0x3E]); // hi[0] = 2, hi[1] = 1.5
    want[2 * d + 18..2 * d + 20].copy_from_slice(&[0x00, 0x41]); // hi[9] = 2.5
    want[4 * d..].copy_from_slice(&[0x01, 0x02, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(out, want);
    let mut deq = vec![0f32; 2 * d];
    FormatId::Q1Calib.imp().dequantize(&out, shape, &mut deq);
    assert_eq!([deq[0], deq[1], deq[9]], [2.0, 0.5, 2.5]);
    assert_eq!([deq[d], deq[d + 1], deq[d + 9]], [-1.0, 1.5, 0.5]);
    // Scores post-scaled: q = e0 + e9 gives x̂_0 + x̂_9 per token.
    let mut q = vec![0f32; d];
    q[0] = 1.0;
    q[9] = 1.0;
    let mut s = [0f32; 2];
    FormatId::Q1Calib.imp().scores(&out, shape, &q, &mut s);
    assert_eq!(s, [4.5, -0.5]);
}

#[test]
fn bad_input_is_an_error_and_appends_nothing() {
    let imp = FormatId::Q1Calib.imp();
    let p = QuantParams::default();
    for role in [Role::Key, Role::Value] {
        let shape = Shape { n: 9, d: 96, role };
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![1.0f32; 9 * 96];
            x[4 * 96 + 50] = bad;
            let mut out = vec![1u8, 2];
            match imp.quantize(&x, shape, &[], &p, &mut out) {
                Err(Error::NonFinite { token, channel }) => assert_eq!((token, channel), (4, 50)),
                r => panic!("{role:?} {bad}: {r:?}"),
            }
            assert_eq!(out, [1, 2]);
        }
        let mut out = Vec::new();
        // A value beyond the f16 range of the cache.
        let mut x = vec![1.0f32; 9 * 96];
        x[3] = 1e6;
        let r = imp.quantize(&x, shape, &[], &p, &mut out);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        // α is a shrink factor in (0, 1].
        for a in [0.0, -0.5, 1.5, f32::NAN] {
            let bad = QuantParams {
                calib_alpha_k: a,
                calib_alpha_v: a,
                ..p
            };
            let r = imp.quantize(&[1.0; 9 * 96], shape, &[], &bad, &mut out);
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "α {a}: {r:?}");
        }
        // Wrong length, unsupported head dim.
        assert!(
            imp.quantize(&[1.0; 9 * 95], shape, &[], &p, &mut out)
                .is_err()
        );
        let s = Shape { d: 48, ..shape };
        assert!(imp.quantize(&[1.0; 9 * 48], s, &[], &p, &mut out).is_err());
        assert!(out.is_empty());
    }
}
