//! `q2_had` / `q4_had` (AKVQ-VL) against references written here from the formulas and the
//! byte layout of `docs/FORMATS.md`, on fresh random inputs (the seed is printed).

use half::f16;
use kvbits::Error;
use kvbits::kv::formats::q2_had::{rotate, wht};
use kvbits::kv::{FormatId, HEAD_DIMS, QuantParams, Role, Shape};
use kvbits::rng::{Rng, rel_err};

const NS: [usize; 5] = [1, 3, 64, 128, 257];
const FORMATS: [(FormatId, usize); 2] = [(FormatId::Q2Had, 2), (FormatId::Q4Had, 4)];

fn seeded() -> Rng {
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    Rng::new(seed)
}

fn shape(n: usize, d: usize) -> Shape {
    Shape {
        n,
        d,
        role: Role::Key,
    }
}

fn clip(c: f32) -> QuantParams {
    QuantParams {
        had_clip: c,
        ..QuantParams::default()
    }
}

/// The explicit Sylvester matrix `H_len / sqrt(len)`, built by its recursion.
fn sylvester(len: usize) -> Vec<Vec<f64>> {
    let mut h = vec![vec![1.0f64]];
    while h.len() < len {
        let k = h.len();
        let mut next = vec![vec![0.0; 2 * k]; 2 * k];
        for i in 0..k {
            for j in 0..k {
                next[i][j] = h[i][j];
                next[i][j + k] = h[i][j];
                next[i + k][j] = h[i][j];
                next[i + k][j + k] = -h[i][j];
            }
        }
        h = next;
    }
    let s = 1.0 / (len as f64).sqrt();
    h.iter()
        .map(|row| row.iter().map(|v| v * s).collect())
        .collect()
}

/// The sub-blocks the spec prescribes per head dim.
fn sub_blocks(d: usize) -> &'static [usize] {
    match d {
        80 => &[64, 16],
        96 => &[64, 32],
        112 => &[64, 32, 16],
        64 => &[64],
        128 => &[128],
        256 => &[256],
        _ => panic!("no head dim {d}"),
    }
}

/// The token rotation as an explicit block-diagonal `d x d` matrix.
fn rotation_matrix(d: usize) -> Vec<Vec<f64>> {
    let mut m = vec![vec![0.0; d]; d];
    let mut at = 0;
    for &len in sub_blocks(d) {
        let h = sylvester(len);
        for i in 0..len {
            for j in 0..len {
                m[at + i][at + j] = h[i][j];
            }
        }
        at += len;
    }
    assert_eq!(at, d);
    m
}

fn mat_vec(m: &[Vec<f64>], x: &[f32]) -> Vec<f32> {
    m.iter()
        .map(|row| row.iter().zip(x).map(|(a, &b)| a * b as f64).sum::<f64>() as f32)
        .collect()
}

/// Keys-like tokens: a few channels 5-20x larger, per-channel offsets.
fn keys_like(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let mut scale = vec![1.0f32; d];
    for _ in 0..2 + rng.below(3) {
        scale[rng.below(d)] = 5.0 + 15.0 * rng.uniform();
    }
    let offset: Vec<f32> = (0..d).map(|_| 0.5 * rng.normal()).collect();
    (0..n * d)
        .map(|i| scale[i % d] * (rng.normal() + offset[i % d]))
        .collect()
}

/// Protect patterns: 0 none (empty slice), 1 none (all false), 2 random ~15%, 3 all.
fn pattern(rng: &mut Rng, n: usize, kind: usize) -> Vec<bool> {
    match kind {
        0 => vec![],
        1 => vec![false; n],
        2 => (0..n).map(|_| rng.uniform() < 0.15).collect(),
        _ => vec![true; n],
    }
}

/// The block and, given the rotation matrix, its dequantization, straight from the formulas
/// and the documented layout; rotation by `rotate` for the codes (tested against the matrix
/// separately), by the explicit matrix for the reconstruction.
fn reference(
    x: &[f32],
    n: usize,
    d: usize,
    bits: usize,
    protect: &[bool],
    clip: f32,
    m: Option<&[Vec<f64>]>,
) -> (Vec<u8>, Vec<f32>) {
    let levels = ((1 << bits) - 1) as f32;
    let prot = |t: usize| protect.get(t) == Some(&true);
    let n_p = (0..n).filter(|&t| prot(t)).count();
    let mut block = (n_p as u32).to_le_bytes().to_vec();
    let mut deq = vec![0f32; n * d];
    for t in (0..n).filter(|&t| !prot(t)) {
        let mut y = x[t * d..(t + 1) * d].to_vec();
        rotate(&mut y);
        let mut codes = vec![0u8; d];
        let mut y_hat = vec![0f32; d];
        for g0 in (0..d).step_by(64) {
            let g1 = (g0 + 64).min(d);
            let min = y[g0..g1].iter().copied().fold(f32::INFINITY, f32::min);
            let max = y[g0..g1].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (lo, hi) = (clip * min, clip * max);
            let lo16 = f16::from_f32(lo);
            let s16 = f16::from_f32((hi - lo) / levels);
            block.extend(lo16.to_le_bytes());
            block.extend(s16.to_le_bytes());
            let (l, s) = (lo16.to_f32(), s16.to_f32());
            for j in g0..g1 {
                let q = if s > 0.0 {
                    ((y[j] - l) / s).clamp(0.0, levels).round()
                } else {
                    0.0
                };
                codes[j] = q as u8;
                y_hat[j] = q * s + l;
            }
        }
        let mut packed = vec![0u8; d * bits / 8];
        for (j, &q) in codes.iter().enumerate() {
            packed[j * bits / 8] |= q << (j * bits % 8);
        }
        block.extend(packed);
        if let Some(m) = m {
            deq[t * d..(t + 1) * d].copy_from_slice(&mat_vec(m, &y_hat));
        }
    }
    for t in (0..n).filter(|&t| prot(t)) {
        for c in 0..d {
            let h = f16::from_f32(x[t * d + c]);
            block.extend(h.to_le_bytes());
            deq[t * d + c] = h.to_f32();
        }
    }
    if n_p > 0 {
        let mut mask = vec![0u8; n.div_ceil(8)];
        for t in (0..n).filter(|&t| prot(t)) {
            mask[t / 8] |= 1 << (t % 8);
        }
        block.extend(mask);
    }
    (block, deq)
}

fn quantize(f: FormatId, x: &[f32], n: usize, d: usize, protect: &[bool]) -> Vec<u8> {
    let mut block = Vec::new();
    f.imp()
        .quantize(x, shape(n, d), protect, &QuantParams::default(), &mut block)
        .unwrap();
    block
}

fn dequantize(f: FormatId, block: &[u8], n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * d];
    f.imp().dequantize(block, shape(n, d), &mut out);
    out
}

#[test]
fn wht_is_the_normalised_sylvester_matrix_and_its_own_inverse() {
    let mut rng = seeded();
    for k in 0..=8 {
        let len = 1 << k;
        let h = sylvester(len);
        let x = rng.normals(len);
        let mut y = x.clone();
        wht(&mut y);
        let e = rel_err(&y, &mat_vec(&h, &x));
        assert!(e < 1e-6, "len {len}: WHT vs matrix {e}");
        let (nx, ny) = (rel_err(&x, &vec![0.0; len]), rel_err(&y, &vec![0.0; len]));
        assert!((nx - ny).abs() < 1e-6 * nx, "len {len}: norm {nx} -> {ny}");
        wht(&mut y);
        let e = rel_err(&y, &x);
        assert!(e < 1e-6, "len {len}: round trip {e}");
    }
}

#[test]
fn rotate_is_block_diagonal_largest_first_and_its_own_inverse() {
    let mut rng = seeded();
    for d in HEAD_DIMS {
        let m = rotation_matrix(d);
        let x = keys_like(&mut rng, 1, d);
        let mut y = x.clone();
        rotate(&mut y);
        let e = rel_err(&y, &mat_vec(&m, &x));
        assert!(e < 1e-6, "d {d}: rotate vs matrix {e}");
        rotate(&mut y);
        let e = rel_err(&y, &x);
        assert!(e < 1e-6, "d {d}: round trip {e}");
    }
}

#[test]
fn blocks_and_reconstruction_match_the_reference() {
    let mut rng = seeded();
    for (f, bits) in FORMATS {
        for d in HEAD_DIMS {
            let m = rotation_matrix(d);
            for n in NS {
                let mut x = keys_like(&mut rng, n, d);
                if n >= 3 {
                    let c = 4.0 * rng.normal();
                    x[d..2 * d].iter_mut().for_each(|v| *v = c);
                    x[2 * d..3 * d].iter_mut().for_each(|v| *v = 0.0);
                }
                for kind in 0..4 {
                    let protect = pattern(&mut rng, n, kind);
                    let n_p = protect.iter().filter(|&&p| p).count();
                    let block = quantize(f, &x, n, d, &protect);
                    let check_deq = kind == 2 || n <= 3;
                    let m = check_deq.then_some(&m[..]);
                    let (want, want_deq) = reference(&x, n, d, bits, &protect, 0.9, m);
                    assert!(
                        block == want,
                        "{f} d {d} n {n} pattern {kind}: bytes differ"
                    );
                    let size = f
                        .imp()
                        .block_size(shape(n, d), n_p, &QuantParams::default());
                    let n_q = n - n_p;
                    let mask = if n_p > 0 { n.div_ceil(8) } else { 0 };
                    assert_eq!(size.codes, n_q * d * bits / 8 + n_p * 2 * d);
                    assert_eq!(size.meta, 4 + n_q * 4 * d.div_ceil(64) + mask);
                    assert_eq!(size.total(), block.len());
                    if check_deq {
                        let deq = dequantize(f, &block, n, d);
                        let e = rel_err(&deq, &want_deq);
                        assert!(e < 1e-5, "{f} d {d} n {n} pattern {kind}: dequantize {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn scores_and_accumulate_match_dequantize() {
    let mut rng = seeded();
    for (f, _) in FORMATS {
        for d in HEAD_DIMS {
            for n in NS {
                let x = keys_like(&mut rng, n, d);
                let protect = pattern(&mut rng, n, 2);
                let block = quantize(f, &x, n, d, &protect);
                let deq = dequantize(f, &block, n, d);

                let q = rng.normals(d);
                let mut s = vec![f32::NAN; n];
                f.imp().scores(&block, shape(n, d), &q, &mut s);
                let want: Vec<f32> = deq
                    .chunks(d)
                    .map(|row| {
                        row.iter()
                            .zip(&q)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>() as f32
                    })
                    .collect();
                // Per token against the dot product's own scale Σ|q_c·x̂_c| (a score may
                // cancel to near zero); over the block by relative error.
                for (t, row) in deq.chunks(d).enumerate() {
                    let scale: f64 = row
                        .iter()
                        .zip(&q)
                        .map(|(&a, &b)| (a * b).abs() as f64)
                        .sum();
                    let e = (s[t] as f64 - want[t] as f64).abs() / scale.max(f64::MIN_POSITIVE);
                    assert!(e < 1e-5, "{f} d {d} n {n} token {t}: score {e}");
                }
                if n >= 64 {
                    let e = rel_err(&s, &want);
                    assert!(e < 1e-5, "{f} d {d} n {n}: scores {e}");
                }

                let p: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
                let out0 = rng.normals(d);
                let mut out = out0.clone();
                f.imp().accumulate(&block, shape(n, d), &p, &mut out);
                let want: Vec<f32> = (0..d)
                    .map(|c| {
                        let sum: f64 = (0..n).map(|t| p[t] as f64 * deq[t * d + c] as f64).sum();
                        (out0[c] as f64 + sum) as f32
                    })
                    .collect();
                let e = rel_err(&out, &want);
                assert!(e < 1e-5, "{f} d {d} n {n}: accumulate {e}");
            }
        }
    }
}

#[test]
fn protected_tokens_are_exact_f16_and_sizes_exact_for_any_count() {
    let mut rng = seeded();
    for (f, _) in FORMATS {
        assert!(f.imp().protects());
        for d in HEAD_DIMS {
            for n in NS {
                for n_p in [0, 1, n / 2, n] {
                    // n_p distinct tokens at random positions.
                    let mut protect = vec![false; n];
                    while protect.iter().filter(|&&p| p).count() < n_p {
                        protect[rng.below(n)] = true;
                    }
                    // Massive activations on the protected tokens.
                    let mut x = keys_like(&mut rng, n, d);
                    for t in (0..n).filter(|&t| protect[t]) {
                        x[t * d + rng.below(d)] = 300.0 * rng.normal();
                    }
                    let block = quantize(f, &x, n, d, &protect);
                    let size = f
                        .imp()
                        .block_size(shape(n, d), n_p, &QuantParams::default());
                    assert_eq!(block.len(), size.total(), "{f} d {d} n {n} n_p {n_p}");
                    let deq = dequantize(f, &block, n, d);
                    for t in (0..n).filter(|&t| protect[t]) {
                        for c in 0..d {
                            let want = f16::from_f32(x[t * d + c]).to_f32();
                            assert_eq!(deq[t * d + c], want, "{f} d {d} token {t} ch {c}");
                        }
                    }
                }
            }
        }
    }
}

/// 2-bit per-token min-max over groups of 64 raw channels, same clip: AKVQ-VL without
/// the rotation.
fn plain_minmax(x: &[f32], d: usize, clip: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        for g in row.chunks(64) {
            let min = g.iter().copied().fold(f32::INFINITY, f32::min);
            let max = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (lo, hi) = (clip * min, clip * max);
            let l = f16::from_f32(lo).to_f32();
            let s = f16::from_f32((hi - lo) / 3.0).to_f32();
            out.extend(g.iter().map(|&v| {
                let q = if s > 0.0 {
                    ((v - l) / s).clamp(0.0, 3.0).round()
                } else {
                    0.0
                };
                q * s + l
            }));
        }
    }
    out
}

#[test]
fn rotation_lowers_the_error_on_outlier_channels() {
    let mut rng = seeded();
    let n = 128;
    for d in HEAD_DIMS {
        let x = keys_like(&mut rng, n, d);
        let block = quantize(FormatId::Q2Had, &x, n, d, &[]);
        let had = rel_err(&dequantize(FormatId::Q2Had, &block, n, d), &x);
        let plain = rel_err(&plain_minmax(&x, d, 0.9), &x);
        eprintln!("d {d}: q2_had {had:.4}, without rotation {plain:.4}");
        assert!(had < plain, "d {d}: q2_had {had} not below plain {plain}");
    }
}

#[test]
fn constant_and_zero_tokens() {
    let mut rng = seeded();
    for (f, bits) in FORMATS {
        for d in HEAD_DIMS {
            // All zeros: exact zeros out, zero scores, accumulate adds nothing.
            let n = 5;
            let block = quantize(f, &vec![0.0; n * d], n, d, &[]);
            assert!(dequantize(f, &block, n, d).iter().all(|&v| v == 0.0));
            let mut s = vec![f32::NAN; n];
            f.imp().scores(&block, shape(n, d), &rng.normals(d), &mut s);
            assert!(s.iter().all(|&v| v == 0.0), "{f} d {d}: {s:?}");
            let out0 = rng.normals(d);
            let mut out = out0.clone();
            f.imp().accumulate(&block, shape(n, d), &[0.5; 5], &mut out);
            assert_eq!(out, out0);

            // A constant token rotates to one spike per sub-block; unclipped, min-max holds
            // the spikes up to f16 steps (d = 112 shares a group between two spikes).
            let c = 1.0 + 4.0 * rng.uniform();
            let x = vec![c; d];
            let mut block = Vec::new();
            f.imp()
                .quantize(&x, shape(1, d), &[], &clip(1.0), &mut block)
                .unwrap();
            let (want, _) = reference(&x, 1, d, bits, &[], 1.0, None);
            assert!(block == want, "{f} d {d}: constant token bytes differ");
            let e = rel_err(&dequantize(f, &block, 1, d), &x);
            let bound = if d == 112 { 0.03 } else { 2e-3 };
            assert!(e < bound, "{f} d {d}: constant token error {e}");
        }
    }
}

#[test]
fn bad_input_is_an_error_and_appends_nothing() {
    let mut rng = seeded();
    for (f, _) in FORMATS {
        let (n, d) = (4, 80);
        let x = keys_like(&mut rng, n, d);
        let quant = |x: &[f32], shape: Shape, protect: &[bool], params: QuantParams| {
            let mut out = vec![7u8; 3];
            let r = f.imp().quantize(x, shape, protect, &params, &mut out);
            assert_eq!(out, [7, 7, 7], "{f}: bytes appended on error");
            r
        };
        let ok = QuantParams::default();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut y = x.clone();
            y[2 * d + 5] = bad;
            let r = quant(&y, shape(n, d), &[], ok);
            assert!(
                matches!(
                    r,
                    Err(Error::NonFinite {
                        token: 2,
                        channel: 5
                    })
                ),
                "{f}: {r:?}"
            );
        }
        for c in [0.0, -0.5, 1.01, f32::NAN, f32::INFINITY] {
            let r = quant(&x, shape(n, d), &[], clip(c));
            assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "{f} clip {c}: {r:?}"
            );
        }
        let mut out = Vec::new();
        f.imp()
            .quantize(&x, shape(n, d), &[], &clip(1.0), &mut out)
            .unwrap();
        // Beyond f16, quantized or protected; and in range but overflowing once rotated
        // (a constant token's energy all lands in one coefficient, sqrt(64)x larger).
        let mut y = x.clone();
        y[d + 3] = 1e6;
        let mut z = x.clone();
        z[d..2 * d].fill(-60000.0);
        for protect in [vec![], vec![false, true, false, false]] {
            let r = quant(&y, shape(n, d), &protect, ok);
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{f}: {r:?}");
        }
        let r = quant(&z, shape(n, d), &[], ok);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{f}: {r:?}");
        let r = f.imp().quantize(
            &z,
            shape(n, d),
            &[false, true, false, false],
            &ok,
            &mut vec![],
        );
        assert!(r.is_ok(), "{f}: a protected row is stored as f16: {r:?}");
        let r = quant(&x, shape(n, d), &[true; 3], ok);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{f}: {r:?}");
        let r = quant(&vec![0.0; n * 100], shape(n, 100), &[], ok);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{f}: {r:?}");
    }
}

#[test]
fn effective_bits() {
    let q2 = FormatId::Q2Had.bits_per_value(128, Role::Key, 128);
    let q4 = FormatId::Q4Had.bits_per_value(128, Role::Value, 128);
    eprintln!("q2_had {q2}, q4_had {q4}");
    assert!((2.5..=2.51).contains(&q2), "q2_had {q2}");
    assert!((4.5..=4.51).contains(&q4), "q4_had {q4}");
}
