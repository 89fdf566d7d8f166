//! `v1_58_tern` against a reference written here from the formulas and the documented layout
//! (docs/FORMATS.md): the whole block byte for byte, dequantized values bit for bit.

use half::f16;
use kvbits::Error;
use kvbits::kv::formats::v1_58_tern::{pack_trits, trit_digit};
use kvbits::kv::{Format, FormatId, HEAD_DIMS, QuantParams, Role, Shape};
use kvbits::rng::{Rng, rel_err};

const NS: [usize; 7] = [1, 4, 5, 7, 128, 131, 300];

fn fmt() -> &'static dyn Format {
    FormatId::V1_58Tern.imp()
}

fn shape(n: usize, d: usize) -> Shape {
    Shape {
        n,
        d,
        role: Role::Value,
    }
}

fn seeded() -> Rng {
    let seed = Rng::fresh_seed();
    println!("seed {seed}");
    Rng::new(seed)
}

/// Gaussian values with a few channels 5-20x larger, as real KV heads have.
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

fn put(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The block and its reconstruction, straight from the formulas.
fn reference(x: &[f32], n: usize, d: usize, protect: &[bool]) -> (Vec<u8>, Vec<f32>) {
    let prot: Vec<bool> = (0..n).map(|t| protect.get(t) == Some(&true)).collect();
    let pro: Vec<usize> = (0..n).filter(|&t| prot[t]).collect();
    let unp: Vec<usize> = (0..n).filter(|&t| !prot[t]).collect();
    let mut block = (pro.len() as u16).to_le_bytes().to_vec();
    let mut xhat = vec![0f32; n * d];
    if !pro.is_empty() {
        let mut mask = vec![0u8; n.div_ceil(8)];
        pro.iter().for_each(|&t| mask[t / 8] |= 1 << (t % 8));
        block.extend(mask);
    }
    let gamma: Vec<f32> = (0..d)
        .map(|c| {
            if unp.is_empty() {
                return 0.0;
            }
            let sum: f64 = unp.iter().map(|&t| (x[t * d + c] as f64).abs()).sum();
            f16::from_f64(sum / unp.len() as f64).to_f32()
        })
        .collect();
    gamma.iter().for_each(|&g| put(&mut block, g));
    let mut lo_step = vec![(0f32, 0f32); d];
    if !pro.is_empty() {
        for (c, ls) in lo_step.iter_mut().enumerate() {
            let col = pro.iter().map(|&t| x[t * d + c]);
            let mn = col.clone().fold(f32::INFINITY, f32::min);
            let mx = col.fold(f32::NEG_INFINITY, f32::max);
            *ls = (f16_round(mn), f16_round((mx - mn) / 3.0));
            put(&mut block, ls.0);
            put(&mut block, ls.1);
        }
    }
    for g in 0..unp.len().div_ceil(5) {
        for c in 0..d {
            let mut v = 0u32;
            for i in 0..5 {
                let digit = match unp.get(5 * g + i) {
                    Some(&t) if gamma[c] > 0.0 => {
                        let q = (x[t * d + c] / gamma[c]).round().clamp(-1.0, 1.0);
                        xhat[t * d + c] = q * gamma[c];
                        (q + 1.0) as u32
                    }
                    _ => 1,
                };
                v = 3 * v + digit;
            }
            block.push((v * 256).div_ceil(243) as u8);
        }
    }
    for &t in &pro {
        let mut row = vec![0u8; d / 4];
        for (c, &(lo, step)) in lo_step.iter().enumerate() {
            let code = if step > 0.0 {
                ((x[t * d + c] - lo) / step).clamp(0.0, 3.0).round()
            } else {
                0.0
            };
            row[c / 4] |= (code as u8) << (2 * (c % 4));
            xhat[t * d + c] = code * step + lo;
        }
        block.extend(row);
    }
    (block, xhat)
}

/// Quantize, then check bytes, reconstruction, size, scores and accumulate.
fn check(rng: &mut Rng, x: &[f32], n: usize, d: usize, protect: &[bool]) -> Vec<f32> {
    let s = shape(n, d);
    let mut block = vec![0xAA]; // appending must leave what is there alone
    fmt()
        .quantize(x, s, protect, &QuantParams::default(), &mut block)
        .unwrap();
    let block = &block[1..];
    let (want, want_hat) = reference(x, n, d, protect);
    assert_eq!(block, &want[..], "block bytes, n={n} d={d}");
    let n_p = protect.iter().filter(|&&p| p).count();
    assert_eq!(
        fmt().block_size(s, n_p, &QuantParams::default()).total(),
        block.len()
    );

    let mut xhat = vec![f32::NAN; n * d];
    fmt().dequantize(block, s, &mut xhat);
    assert_eq!(xhat, want_hat, "dequantized, n={n} d={d}");

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
    let e = rel_err(&scores, &want);
    assert!(e < 1e-5, "scores rel err {e}, n={n} d={d}");

    let p: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    let start = rng.normals(d);
    let mut acc = start.clone();
    fmt().accumulate(block, s, &p, &mut acc);
    let want: Vec<f32> = (0..d)
        .map(|c| {
            let sum: f64 = (0..n).map(|t| p[t] as f64 * xhat[t * d + c] as f64).sum();
            (start[c] as f64 + sum) as f32
        })
        .collect();
    let e = rel_err(&acc, &want);
    assert!(e < 1e-5, "accumulate rel err {e}, n={n} d={d}");
    xhat
}

#[test]
fn matches_reference_for_every_shape() {
    let mut rng = seeded();
    for d in HEAD_DIMS {
        for n in NS {
            let x = outlier_channels(&mut rng, n, d);
            check(&mut rng, &x, n, d, &[]);
            check(&mut rng, &x, n, d, &vec![false; n]);
            let some: Vec<bool> = (0..n).map(|_| rng.uniform() < 0.15).collect();
            check(&mut rng, &x, n, d, &some);
            check(&mut rng, &x, n, d, &vec![true; n]);
        }
    }
}

#[test]
fn trits_round_trip_all_243_bytes() {
    let mut bytes = std::collections::HashSet::new();
    for v in 0..243u32 {
        let digits: [u8; 5] = std::array::from_fn(|i| (v / 3u32.pow(4 - i as u32) % 3) as u8);
        let byte = pack_trits(digits);
        assert_eq!(byte as u32, (v * 256).div_ceil(243), "encoding of {v}");
        for (i, &digit) in digits.iter().enumerate() {
            assert_eq!(trit_digit(byte, i), digit, "digit {i} of {v}");
        }
        bytes.insert(byte);
    }
    assert_eq!(bytes.len(), 243);
}

#[test]
fn sizes_are_exact() {
    let mut rng = seeded();
    for d in HEAD_DIMS {
        for n in NS {
            for n_p in [0, 1, n / 3, n] {
                let mut protect = vec![false; n];
                protect[..n_p].iter_mut().for_each(|p| *p = true);
                let x = rng.normals(n * d);
                let mut out = Vec::new();
                let s = shape(n, d);
                fmt()
                    .quantize(&x, s, &protect, &QuantParams::default(), &mut out)
                    .unwrap();
                let size = fmt().block_size(s, n_p, &QuantParams::default());
                assert_eq!(out.len(), size.total(), "n={n} d={d} n_p={n_p}");
                let mask_minmax = if n_p > 0 { n.div_ceil(8) + 4 * d } else { 0 };
                assert_eq!(size.meta, 2 + 2 * d + mask_minmax);
                assert_eq!(size.codes, (n - n_p).div_ceil(5) * d + n_p * d / 4);
            }
        }
    }
    let bits = FormatId::V1_58Tern.bits_per_value(128, Role::Value, 128);
    println!("v1_58_tern: {bits:.4} bits per value at n=128, d=128");
    assert!(bits <= 1.80, "{bits}");
}

#[test]
fn protection_lowers_error_on_salient_tokens() {
    let mut rng = seeded();
    let (n, d) = (128, 128);
    let mut x = outlier_channels(&mut rng, n, d);
    let protect: Vec<bool> = (0..n).map(|_| rng.uniform() < 0.1).collect();
    for t in (0..n).filter(|&t| protect[t]) {
        x[t * d..(t + 1) * d].iter_mut().for_each(|v| *v *= 8.0);
    }
    let with = check(&mut rng, &x, n, d, &protect);
    let without = check(&mut rng, &x, n, d, &[]);

    let rows = |v: &[f32], keep: bool| -> Vec<f32> {
        (0..n)
            .filter(|&t| protect[t] == keep)
            .flat_map(|t| v[t * d..(t + 1) * d].to_vec())
            .collect()
    };
    let (e_with, e_without) = (
        rel_err(&rows(&with, true), &rows(&x, true)),
        rel_err(&rows(&without, true), &rows(&x, true)),
    );
    println!("salient tokens: rel err {e_with:.4} protected, {e_without:.4} not");
    assert!(e_with < e_without);

    // Protected values lie within half a 2-bit step (plus f16 rounding) of the input;
    // unprotected ones are -γ, 0 or γ of their channel.
    let mut block = Vec::new();
    fmt()
        .quantize(
            &x,
            shape(n, d),
            &protect,
            &QuantParams::default(),
            &mut block,
        )
        .unwrap();
    for c in 0..d {
        let col: Vec<f32> = (0..n)
            .filter(|&t| protect[t])
            .map(|t| x[t * d + c])
            .collect();
        let mn = col.iter().copied().fold(f32::INFINITY, f32::min);
        let mx = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let step = (mx - mn) / 3.0;
        let slack = 4e-3 * (mn.abs() + mx.abs());
        let gammas: Vec<f32> = (0..n)
            .filter(|&t| !protect[t])
            .map(|t| with[t * d + c].abs())
            .filter(|&v| v > 0.0)
            .collect();
        for t in 0..n {
            let (v, h) = (x[t * d + c], with[t * d + c]);
            if protect[t] {
                assert!(
                    (v - h).abs() <= 0.5 * step + slack,
                    "t={t} c={c}: {v} -> {h}"
                );
            } else {
                assert!(h == 0.0 || gammas.iter().all(|&g| g == h.abs()));
            }
        }
    }
}

#[test]
fn constant_channels_and_zeros() {
    let mut rng = seeded();
    for d in HEAD_DIMS {
        let n = 131;
        let consts: Vec<f32> = (0..d).map(|_| 10.0 * rng.normal()).collect();
        let x: Vec<f32> = (0..n * d).map(|i| consts[i % d]).collect();
        let xhat = check(&mut rng, &x, n, d, &[]);
        let want: Vec<f32> = x.iter().map(|&v| f16_round(v)).collect();
        assert_eq!(xhat, want, "a constant channel is ±γ = its value");
        let some: Vec<bool> = (0..n).map(|t| t % 7 == 0).collect();
        assert_eq!(check(&mut rng, &x, n, d, &some), want);

        let zeros = vec![0f32; n * d];
        for protect in [vec![], some] {
            let xhat = check(&mut rng, &zeros, n, d, &protect);
            assert!(xhat.iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn rejects_bad_input() {
    let s = shape(7, 64);
    let params = QuantParams::default();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; 7 * 64];
        x[3 * 64 + 10] = bad;
        let mut out = Vec::new();
        let r = fmt().quantize(&x, s, &[], &params, &mut out);
        assert!(matches!(
            r,
            Err(Error::NonFinite {
                token: 3,
                channel: 10
            })
        ));
        assert!(out.is_empty());
    }
    let x = vec![0.5f32; 7 * 64];
    let r = fmt().quantize(&x, s, &[true; 3], &params, &mut Vec::new());
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
    // Beyond the f16 range of the cache.
    let huge = vec![1e6f32; 7 * 64];
    let r = fmt().quantize(&huge, s, &[], &params, &mut Vec::new());
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
    assert!(fmt().protects());
}
