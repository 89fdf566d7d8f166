//! The fast CPU paths (`kv::simd`, the threaded decode) against the scalar reference: every
//! format, head dim and path this CPU has, odd token counts, fresh random inputs.

mod common;

use common::kv_data;
use kvbits::kv::simd::{Isa, kernel};
use kvbits::kv::{
    Applies, BlockTokens, CacheConfig, FormatId, HEAD_DIMS, KvCache, Modality, QuantParams, Role,
    Rows, Shape,
};
use kvbits::rng::{Rng, rel_err};

/// Attention and kernel outputs may differ from the reference by summation order only.
const TOL: f64 = 1e-5;

fn paths() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.supported()).collect()
}

#[test]
fn kernels_match_the_reference_per_head() {
    let mut rng = Rng::new(common::seed("kernels_match_the_reference_per_head"));
    for f in FormatId::ALL {
        let imp = f.imp();
        for &role in f.info().applies.roles() {
            for (j, d) in HEAD_DIMS.into_iter().enumerate() {
                for (i, n) in [1, 5, 17, 128, 131].into_iter().enumerate() {
                    // k1_5_mix's split at every head dim: at 0.75 the sign bits of d = 64 and
                    // 80 take under four bytes a token.
                    let params = QuantParams {
                        mix_fraction: [0.25, 0.5, 0.75][(i + j) % 3],
                        ..QuantParams::default()
                    };
                    let shape = Shape { n, d, role };
                    let x = kv_data(&mut rng, n, d);
                    let protect: Vec<bool> = if imp.protects() {
                        (0..n).map(|_| rng.below(5) == 0).collect()
                    } else {
                        vec![]
                    };
                    let mut block = Vec::new();
                    imp.quantize(&x, shape, &protect, &params, &mut block)
                        .unwrap();
                    let nq = [1, 3, 7, 8][rng.below(4)];
                    let stride = n + rng.below(3);
                    let q = rng.normals(nq * d);
                    let p: Vec<f32> = (0..nq * stride).map(|_| rng.uniform()).collect();
                    let init = rng.normals(nq * d);
                    // A lone score can cancel to near zero: its error is measured against
                    // the size of its terms, Σ_c |q_c·x̂_tc|.
                    let mut xh = vec![0f32; n * d];
                    imp.dequantize(&block, shape, &mut xh);
                    let mag2: f64 = (0..nq * n)
                        .map(|i| {
                            let (h, t) = (i / n, i % n);
                            let m: f64 = (0..d)
                                .map(|c| (q[h * d + c] as f64 * xh[t * d + c] as f64).abs())
                                .sum();
                            m * m
                        })
                        .sum();
                    let (mut want_s, mut want_a) = (vec![0f32; nq * n], init.clone());
                    for h in 0..nq {
                        let qh = &q[h * d..(h + 1) * d];
                        imp.scores(&block, shape, qh, &mut want_s[h * n..(h + 1) * n]);
                        let ph = &p[h * stride..h * stride + n];
                        imp.accumulate(&block, shape, ph, &mut want_a[h * d..(h + 1) * d]);
                    }
                    for isa in paths() {
                        let k = kernel(f, isa);
                        let mut got = vec![f32::NAN; nq * stride];
                        k.scores(&block, shape, &q, &mut got, stride);
                        let got: Vec<f32> = (0..nq)
                            .flat_map(|h| got[h * stride..h * stride + n].to_vec())
                            .collect();
                        let what = format!("{f} {role:?} d {d} n {n} heads {nq} {isa}");
                        let err2: f64 = got
                            .iter()
                            .zip(&want_s)
                            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                            .sum();
                        let e = (err2 / mag2.max(f64::MIN_POSITIVE)).sqrt();
                        assert!(e < TOL, "{what}: scores rel. error {e}");
                        let mut got = init.clone();
                        k.accumulate(&block, shape, &p, stride, &mut got);
                        let e = rel_err(&got, &want_a);
                        assert!(e < TOL, "{what}: accumulate rel. error {e}");
                    }
                }
            }
        }
    }
}

/// A cache of `cfg` filled with a text prompt, a visual span (with saliency) and text tokens
/// one at a time, so that it holds blocks, partial blocks, calibrated spans and the residual.
fn filled(cfg: CacheConfig, rng: &mut Rng, sizes: [usize; 3]) -> KvCache {
    let (hk, d) = (cfg.n_head_kv, cfg.head_dim);
    let mut c = KvCache::new(cfg).unwrap();
    let [prompt, visual, tail] = sizes;
    for (n, modality) in [(prompt, Modality::Text), (visual, Modality::Visual)] {
        let k = kv_data(rng, n * hk, d);
        let v = kv_data(rng, n * hk, d);
        let sal: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
        let sal = (modality == Modality::Visual).then_some(&sal[..]);
        c.append(0, Rows::F32(&k), Rows::F32(&v), n, modality, sal)
            .unwrap();
    }
    for _ in 0..tail {
        let (k, v) = (kv_data(rng, hk, d), kv_data(rng, hk, d));
        c.append(0, Rows::F32(&k), Rows::F32(&v), 1, Modality::Text, None)
            .unwrap();
    }
    c
}

/// Every preset and every format as a plain pair, against the reference walk (prefill of the
/// last token is the per-query reference path).
#[test]
fn decode_matches_the_reference_walk() {
    let mut rng = Rng::new(common::seed("decode_matches_the_reference_walk"));
    let mut cfgs = Vec::new();
    for d in HEAD_DIMS {
        let hk = 1 + rng.below(3);
        for p in CacheConfig::PRESETS {
            cfgs.push(CacheConfig::preset(p, 1, hk, d).unwrap());
        }
        for f in FormatId::ALL {
            let k = if f.info().applies == Applies::Values {
                FormatId::F16
            } else {
                f
            };
            let v = if f.info().applies == Applies::Keys {
                FormatId::F16
            } else {
                f
            };
            let mut cfg = CacheConfig::pair(k, v, 1, hk, d);
            if rng.below(2) == 0 {
                cfg.block_tokens = BlockTokens::Fixed(32 + rng.below(100));
            }
            cfgs.push(cfg);
        }
    }
    for cfg in cfgs {
        let (hk, d) = (cfg.n_head_kv, cfg.head_dim);
        let what = cfg.to_string();
        let sizes = [1 + rng.below(200), 1 + rng.below(1500), rng.below(40)];
        let cache = filled(cfg, &mut rng, sizes);
        let n_head = hk * [1, 2, 7][rng.below(3)];
        let q: Vec<f32> = rng.normals(n_head * d).iter().map(|x| 0.3 * x).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut want = vec![0f32; n_head * d];
        cache
            .attention_prefill(0, &q, 1, n_head, &mut want, scale)
            .unwrap();
        for isa in paths() {
            let mut got = vec![f32::NAN; n_head * d];
            cache
                .attention_decode_on(0, &q, n_head, &mut got, scale, isa)
                .unwrap();
            let e = rel_err(&got, &want);
            assert!(e < TOL, "{what}, tokens {sizes:?}, {isa}: rel. error {e}");
        }
    }
}

/// Work is cut into fixed chunks and merged in order: one thread or two give the same bits.
#[test]
fn decode_does_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(common::seed("decode_does_not_depend_on_the_thread_count"));
    for p in CacheConfig::PRESETS {
        let cache = filled(
            CacheConfig::preset(p, 1, 4, 128).unwrap(),
            &mut rng,
            [100, 5000, 7],
        );
        let q = rng.normals(28 * 128);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; 28 * 128];
            pool.install(|| cache.attention_decode(0, &q, 28, &mut out, 0.1))
                .unwrap();
            out
        };
        let one = run(1);
        for threads in [2, 3] {
            let many = run(threads);
            let same = one
                .iter()
                .zip(&many)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{p}: {threads} threads differ from one");
        }
    }
}

#[test]
fn paths_by_name_and_unsupported_ones_are_errors() {
    for isa in Isa::ALL {
        assert_eq!(Isa::from_name(isa.name()).unwrap(), isa);
    }
    assert!(Isa::from_name("sse9").is_err());
    assert!(Isa::Scalar.supported());
    let cache = filled(
        CacheConfig::preset("calibquant", 1, 1, 64).unwrap(),
        &mut Rng::new(1),
        [3, 40, 0],
    );
    let mut out = vec![0f32; 64];
    for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
        let r = cache.attention_decode_on(0, &[0.0; 64], 1, &mut out, 1.0, isa);
        assert!(r.is_err(), "{isa} is not on this CPU");
    }
    // Bad shapes are errors on every path, not panics.
    for isa in paths() {
        let r = cache.attention_decode_on(0, &[0.0; 63], 1, &mut out, 1.0, isa);
        assert!(r.is_err());
        let r = cache.attention_decode_on(0, &[0.0; 64], 1, &mut out[..63], 1.0, isa);
        assert!(r.is_err());
    }
}

/// The fast quantizers write the reference's bytes, for every format, role, head dim, odd
/// token counts and protect masks, on this process's path.
#[test]
fn quantize_writes_the_reference_bytes() {
    let mut rng = Rng::new(common::seed("quantize_writes_the_reference_bytes"));
    let params = QuantParams::default();
    for f in FormatId::ALL {
        for &role in f.info().applies.roles() {
            for d in HEAD_DIMS {
                for n in [1, 3, 32, 33, 128, 257] {
                    let shape = Shape { n, d, role };
                    let mut x = kv_data(&mut rng, n, d);
                    // Ties and signed zeros, where rounding and min/max choices show.
                    for _ in 0..n {
                        let i = rng.below(n * d);
                        x[i] = [0.0, -0.0, 0.5, -1.5, 2.5][rng.below(5)];
                    }
                    let protect: Vec<bool> = if f.imp().protects() {
                        (0..n).map(|_| rng.below(4) == 0).collect()
                    } else {
                        vec![]
                    };
                    let (mut want, mut got) = (vec![7u8], vec![7u8]);
                    f.imp()
                        .quantize(&x, shape, &protect, &params, &mut want)
                        .unwrap();
                    kvbits::kv::simd::quantize(f, &x, shape, &protect, &params, &mut got).unwrap();
                    assert!(got == want, "{f} {role:?} d {d} n {n}: bytes differ");
                }
            }
        }
    }
    // Errors as the reference gives them, nothing appended.
    let shape = Shape {
        n: 2,
        d: 64,
        role: Role::Key,
    };
    for f in FormatId::ALL {
        let mut out = vec![];
        let bad = [f32::NAN; 128];
        assert!(kvbits::kv::simd::quantize(f, &bad, shape, &[], &params, &mut out).is_err());
        assert!(kvbits::kv::simd::quantize(f, &bad[..5], shape, &[], &params, &mut out).is_err());
        assert!(out.is_empty(), "{f}");
    }
}

/// `KVBITS_CPU` forces a path (the bench reports the one it ran); a name not known falls back
/// to the best path with a warning rather than failing.
#[test]
fn kvbits_cpu_forces_the_path() {
    let run = |value: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvbits"))
            .args(["bench", "--device", "cpu", "--tokens", "40", "--json"])
            .env("KVBITS_CPU", value)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = v["decode"].as_array().unwrap();
        assert!(rows.iter().all(|r| r["us"].as_f64().unwrap() > 0.0));
        (
            v["isa"].as_str().unwrap().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(run("scalar").0, "scalar");
    let (isa, err) = run("sse9");
    assert_eq!(isa, Isa::best().name());
    assert!(err.contains("KVBITS_CPU"), "{err}");
}
