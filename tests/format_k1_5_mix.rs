//! `k1_5_mix` against a reference written here from the formulas (a naive O(N²) DFT in f64)
//! and the documented layout (docs/FORMATS.md): mask, parameters, codes and sign bits
//! exactly, dequantized values by relative error.

use half::f16;
use kvbits::Error;
use kvbits::kv::formats::k1_5_mix::{K1_5Mix, adjoint, synthesize};
use kvbits::kv::{Format, FormatId, HEAD_DIMS, QuantParams, Role, Shape};
use kvbits::rng::{Rng, rel_err};
use std::f64::consts::TAU;

const NS: [usize; 7] = [1, 4, 5, 7, 128, 131, 300];

fn fmt() -> &'static dyn Format {
    FormatId::K1_5Mix.imp()
}

fn shape(n: usize, d: usize) -> Shape {
    Shape {
        n,
        d,
        role: Role::Key,
    }
}

fn params(mix_fraction: f32) -> QuantParams {
    QuantParams {
        mix_fraction,
        ..QuantParams::default()
    }
}

fn seeded() -> Rng {
    let seed = Rng::fresh_seed();
    println!("seed {seed}");
    Rng::new(seed)
}

/// Gaussian values with a few channels 5-20x larger, as real keys have.
fn outlier_channels(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let mut x = rng.normals(n * d);
    for _ in 0..4 {
        let (c, f) = (rng.below(d), 5.0 + 15.0 * rng.uniform());
        (0..n).for_each(|t| x[t * d + c] *= f);
    }
    x
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// `(cos, sin)` of `2πm/N` for `m = 0..N`: angles of a length-N DFT, reduced mod N.
fn twiddles(len: usize) -> Vec<(f64, f64)> {
    (0..len)
        .map(|m| (TAU * m as f64 / len as f64).sin_cos())
        .map(|(s, c)| (c, s))
        .collect()
}

/// Coefficients Re Z_0, Re Z_{N/2}, Re Z_1, Im Z_1, … of `Z_k = Σ_n z_n e^{-2πikn/N}`.
fn dft(z: &[f64]) -> Vec<f64> {
    let len = z.len();
    let tw = twiddles(len);
    let bin = |k: usize| -> (f64, f64) {
        z.iter().enumerate().fold((0.0, 0.0), |(re, im), (i, &v)| {
            let (cos, sin) = tw[(k * i) % len];
            (re + v * cos, im - v * sin)
        })
    };
    let mut c = vec![bin(0).0, bin(len / 2).0];
    for k in 1..len / 2 {
        let (re, im) = bin(k);
        c.extend([re, im]);
    }
    c
}

/// The real signal whose coefficients (as [`dft`] orders them) are `c`, written out.
fn idft(c: &[f64]) -> Vec<f64> {
    let len = c.len();
    let tw = twiddles(len);
    (0..len)
        .map(|i| {
            let mut v = c[0] + if i % 2 == 0 { c[1] } else { -c[1] };
            for k in 1..len / 2 {
                let (cos, sin) = tw[(k * i) % len];
                v += 2.0 * (c[2 * k] * cos - c[2 * k + 1] * sin);
            }
            v / len as f64
        })
        .collect()
}

struct Reference {
    mask: Vec<bool>,
    hi: Vec<usize>,
    lo: Vec<usize>,
    /// Offset and step per 2-bit channel.
    minmax: Vec<(f32, f32)>,
    scales: Vec<f32>,
    /// `n × Dh` 2-bit codes.
    codes: Vec<u8>,
    /// `n × Dl` coefficients before quantization.
    coef: Vec<f64>,
    xhat: Vec<f64>,
}

fn reference(x: &[f32], n: usize, d: usize, mix_fraction: f32) -> Reference {
    let dh = (mix_fraction as f64 * d as f64 / 8.0).round() as usize * 8;
    let range: Vec<f32> = (0..d)
        .map(|c| {
            let col = (0..n).map(|t| x[t * d + c]);
            col.clone().fold(f32::NEG_INFINITY, f32::max) - col.fold(f32::INFINITY, f32::min)
        })
        .collect();
    // Channel c is 2-bit when fewer than Dh channels beat it (wider, or as wide and lower).
    let mask: Vec<bool> = (0..d)
        .map(|c| {
            let beat = (0..d)
                .filter(|&o| range[o] > range[c] || (range[o] == range[c] && o < c))
                .count();
            beat < dh
        })
        .collect();
    let hi: Vec<usize> = (0..d).filter(|&c| mask[c]).collect();
    let lo: Vec<usize> = (0..d).filter(|&c| !mask[c]).collect();
    let dl = lo.len();
    let mut xhat = vec![0f64; n * d];

    let mut minmax = Vec::new();
    let mut codes = vec![0u8; n * dh];
    for (j, &c) in hi.iter().enumerate() {
        let col = (0..n).map(|t| x[t * d + c]);
        let mn = col.clone().fold(f32::INFINITY, f32::min);
        let mx = col.fold(f32::NEG_INFINITY, f32::max);
        let (lo, step) = (f16_round(mn), f16_round((mx - mn) / 3.0));
        for t in 0..n {
            let q = if step > 0.0 {
                ((x[t * d + c] - lo) / step).clamp(0.0, 3.0).round()
            } else {
                0.0
            };
            codes[t * dh + j] = q as u8;
            xhat[t * d + c] = (q * step + lo) as f64;
        }
        minmax.push((lo, step));
    }

    let coef: Vec<f64> = (0..n)
        .flat_map(|t| dft(&lo.iter().map(|&c| x[t * d + c] as f64).collect::<Vec<_>>()))
        .collect();
    let scales: Vec<f32> = (0..dl)
        .map(|k| {
            let mean = (0..n).map(|t| coef[t * dl + k].abs()).sum::<f64>() / n as f64;
            f16::from_f64(mean).to_f32()
        })
        .collect();
    for t in 0..n {
        let signed: Vec<f64> = (0..dl)
            .map(|k| {
                let s = scales[k] as f64;
                if coef[t * dl + k] >= 0.0 { s } else { -s }
            })
            .collect();
        for (&c, v) in lo.iter().zip(idft(&signed)) {
            xhat[t * d + c] = v;
        }
    }
    Reference {
        mask,
        hi,
        lo,
        minmax,
        scales,
        codes,
        coef,
        xhat,
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

/// Quantize with `mix_fraction`, parse the block by the documented layout, compare with the
/// reference; check size, dequantize, scores and accumulate. Returns the reconstruction.
fn check(rng: &mut Rng, x: &[f32], n: usize, d: usize, mix_fraction: f32) -> Vec<f32> {
    let s = shape(n, d);
    let p = params(mix_fraction);
    let mut block = vec![0x55]; // appending must leave what is there alone
    fmt().quantize(x, s, &[], &p, &mut block).unwrap();
    let block = &block[1..];
    let r = reference(x, n, d, mix_fraction);
    let (dh, dl) = (r.hi.len(), r.lo.len());
    let ctx = format!("n={n} d={d} fraction={mix_fraction}");

    let size = K1_5Mix.block_size(s, 0, &p);
    assert_eq!(block.len(), size.total(), "{ctx}");
    assert_eq!(size.meta, d / 8 + 4 * dh + 2 * dl, "{ctx}");
    assert_eq!(size.codes, n * (dh / 4 + dl / 8), "{ctx}");
    if mix_fraction == 0.5 {
        assert_eq!(fmt().block_size(s, 0, &QuantParams::default()), size);
    }

    let mask: Vec<bool> = (0..d).map(|c| block[c / 8] >> (c % 8) & 1 == 1).collect();
    assert_eq!(mask, r.mask, "mask, {ctx}");
    let params_at = &block[d / 8..];
    for (j, &(lo, step)) in r.minmax.iter().enumerate() {
        assert_eq!(
            (f16_at(params_at, 2 * j), f16_at(params_at, 2 * j + 1)),
            (lo, step)
        );
    }
    let scales_at = &block[d / 8 + 4 * dh..];
    for (k, &scale) in r.scales.iter().enumerate() {
        assert_eq!(f16_at(scales_at, k), scale, "scale {k}, {ctx}");
    }
    let stride = dh / 4 + dl / 8;
    for t in 0..n {
        let row = &block[size.meta + t * stride..];
        for j in 0..dh {
            let code = row[j / 4] >> (2 * (j % 4)) & 3;
            assert_eq!(code, r.codes[t * dh + j], "code t={t} j={j}, {ctx}");
        }
        let coef = &r.coef[t * dl..(t + 1) * dl];
        let tiny = 1e-9 * coef.iter().fold(0f64, |m, c| m.max(c.abs()));
        for (k, &c) in coef.iter().enumerate() {
            let bit = row[dh / 4 + k / 8] >> (k % 8) & 1 == 1;
            // The sign of a coefficient that is zero up to rounding is arbitrary.
            if c.abs() > tiny {
                assert_eq!(bit, c >= 0.0, "bit t={t} k={k}, {ctx}");
            }
        }
    }

    let mut xhat = vec![f32::NAN; n * d];
    fmt().dequantize(block, s, &mut xhat);
    for t in 0..n {
        for &c in &r.hi {
            assert_eq!(
                xhat[t * d + c] as f64,
                r.xhat[t * d + c],
                "2-bit value, {ctx}"
            );
        }
    }
    let want: Vec<f32> = r.xhat.iter().map(|&v| v as f32).collect();
    let e = rel_err(&xhat, &want);
    assert!(e < 1e-5, "dequantized rel err {e}, {ctx}");

    let q = rng.normals(d);
    let mut scores = vec![0f32; n];
    fmt().scores(block, s, &q, &mut scores);
    let want: Vec<f32> = (0..n)
        .map(|t| {
            (0..d)
                .map(|c| q[c] as f64 * xhat[t * d + c] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    // Against the size of the terms, not of the sums: a single score may cancel to near zero,
    // and scores come from the FFT coefficients, not from the rows the reference sums.
    let err: f64 = scores
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let terms: f64 = (0..n)
        .map(|t| {
            (0..d)
                .map(|c| (q[c] as f64 * xhat[t * d + c] as f64).abs())
                .sum::<f64>()
                .powi(2)
        })
        .sum::<f64>()
        .sqrt();
    let e = err / terms.max(f64::MIN_POSITIVE);
    assert!(e < 1e-5, "scores error {e} of the terms' size, {ctx}");

    let pw: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    let start = rng.normals(d);
    let mut acc = start.clone();
    fmt().accumulate(block, s, &pw, &mut acc);
    let want: Vec<f32> = (0..d)
        .map(|c| {
            let sum: f64 = (0..n).map(|t| pw[t] as f64 * xhat[t * d + c] as f64).sum();
            (start[c] as f64 + sum) as f32
        })
        .collect();
    let e = rel_err(&acc, &want);
    assert!(e < 1e-5, "accumulate rel err {e}, {ctx}");
    xhat
}

#[test]
fn matches_reference_for_every_shape() {
    let mut rng = seeded();
    for d in HEAD_DIMS {
        for n in NS {
            let x = outlier_channels(&mut rng, n, d);
            check(&mut rng, &x, n, d, 0.5);
        }
        for fraction in [0.25, 0.3, 0.75] {
            for n in [7, 128] {
                let x = outlier_channels(&mut rng, n, d);
                check(&mut rng, &x, n, d, fraction);
            }
        }
    }
}

#[test]
fn synthesis_and_adjoint_match_the_dequantizer_matrix() {
    let mut rng = seeded();
    for len in (16..=192).step_by(8) {
        // Column j of the dequantizer matrix M is the signal of the j-th unit coefficient.
        let mut m = vec![0f64; len * len];
        for j in 0..len {
            let mut e = vec![0f64; len];
            e[j] = 1.0;
            let mut col = vec![0f64; len];
            synthesize(&e, &mut col);
            let want = idft(&e);
            for i in 0..len {
                assert!((col[i] - want[i]).abs() < 1e-12, "len={len} M[{i}][{j}]");
                m[i * len + j] = col[i];
            }
        }
        let q = rng.normals(len);
        let mut w = vec![0f64; len];
        adjoint(&q, &mut w);
        for j in 0..len {
            let want: f64 = (0..len).map(|i| m[i * len + j] * q[i] as f64).sum();
            assert!(
                (w[j] - want).abs() < 1e-12,
                "len={len} w[{j}] {} != {want}",
                w[j]
            );
        }
    }
}

#[test]
fn sizes_and_bits() {
    for d in HEAD_DIMS {
        for fraction in [0.25, 0.5, 0.75] {
            let size = K1_5Mix.block_size(shape(1, d), 0, &params(fraction));
            let dh = (size.meta - d / 8) / 2 - d;
            let want = (fraction as f64 * d as f64 / 8.0).round() as usize * 8;
            assert_eq!(dh, want, "d={d} fraction={fraction}");
            assert!(
                dh.is_multiple_of(8) && (d - dh).is_multiple_of(8),
                "d={d} fraction={fraction}"
            );
        }
    }
    let bits = FormatId::K1_5Mix.bits_per_value(128, Role::Key, 128);
    println!("k1_5_mix: {bits:.4} bits per value at n=128, d=128");
    assert!(bits <= 1.75, "{bits}");
}

/// Laplace noise: heavy tails make per-channel signs lose more than the near-Gaussian
/// spectrum coefficients do.
fn laplace(rng: &mut Rng) -> f32 {
    let u = rng.uniform();
    let mag = -(1.0 - rng.uniform()).ln();
    if u < 0.5 { mag } else { -mag }
}

#[test]
fn beats_plain_sign_quantization_of_the_same_channels() {
    let mut rng = seeded();
    let (n, d) = (128, 128);
    let mut x: Vec<f32> = (0..n * d).map(|_| laplace(&mut rng)).collect();
    for c in 0..8 {
        (0..n).for_each(|t| x[t * d + 11 * c] *= 10.0);
    }
    let xhat = check(&mut rng, &x, n, d, 0.5);
    let r = reference(&x, n, d, 0.5);
    // Per low-range channel: sign times the f16 mean magnitude.
    let mut sign = vec![0f32; n * d];
    for &c in &r.lo {
        let mean = (0..n).map(|t| x[t * d + c].abs() as f64).sum::<f64>() / n as f64;
        let s = f16::from_f64(mean).to_f32();
        (0..n).for_each(|t| sign[t * d + c] = if x[t * d + c] >= 0.0 { s } else { -s });
    }
    let lo = |v: &[f32]| -> Vec<f32> {
        (0..n)
            .flat_map(|t| r.lo.iter().map(move |&c| v[t * d + c]))
            .collect()
    };
    let (e_fft, e_sign) = (rel_err(&lo(&xhat), &lo(&x)), rel_err(&lo(&sign), &lo(&x)));
    println!("low-range channels: rel err {e_fft:.4} via rFFT, {e_sign:.4} plain sign");
    assert!(e_fft < e_sign);
}

#[test]
fn constant_tokens_zeros_and_single_token() {
    let mut rng = seeded();
    for d in HEAD_DIMS {
        // Every token the same: every range is 0, so the lowest channels are 2-bit and exact
        // to f16; each coefficient has one magnitude, so the rest is exact to its f16 scale.
        for n in [1, 131] {
            let token: Vec<f32> = (0..d).map(|_| 3.0 * rng.normal()).collect();
            let x: Vec<f32> = (0..n * d).map(|i| token[i % d]).collect();
            let xhat = check(&mut rng, &x, n, d, 0.5);
            let dh = d / 2;
            for t in 0..n {
                let row = &xhat[t * d..(t + 1) * d];
                for c in 0..dh {
                    assert_eq!(row[c], f16_round(token[c]));
                }
                let e = rel_err(&row[dh..], &token[dh..]);
                assert!(e < 1e-3, "d={d} n={n}: rel err {e}");
            }
        }
        let zeros = vec![0f32; 131 * d];
        let xhat = check(&mut rng, &zeros, 131, d, 0.5);
        assert!(xhat.iter().all(|&v| v == 0.0));
    }
}

#[test]
fn rejects_bad_input() {
    let s = shape(7, 64);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; 7 * 64];
        x[2 * 64 + 9] = bad;
        let mut out = Vec::new();
        let r = fmt().quantize(&x, s, &[], &QuantParams::default(), &mut out);
        assert!(matches!(
            r,
            Err(Error::NonFinite {
                token: 2,
                channel: 9
            })
        ));
        assert!(out.is_empty());
    }
    let x = vec![0.5f32; 7 * 64];
    for fraction in [0.2, 0.2499, 0.7501, 0.9, -0.5, f32::NAN] {
        let r = fmt().quantize(&x, s, &[], &params(fraction), &mut Vec::new());
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{fraction}");
    }
    // In the f16 range, yet the DC coefficient (a sum over 32 channels) overflows f16.
    let huge = vec![60000f32; 7 * 64];
    let r = fmt().quantize(&huge, s, &[], &QuantParams::default(), &mut Vec::new());
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
    assert!(!fmt().protects());
}
