//! The device-resident cache against the CPU cache, fed the same appends: the same ledger,
//! the same bytes, the same attention and dequantized rows; a snapshot round trip through
//! the host; bad input refused. Skipped (with a message) where there is no GPU. Inputs are
//! fresh random values (seed printed).
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use half::f16;
use kvbits::cuda::{DeviceBuffer, DeviceCache, Stream};
use kvbits::kv::{BlockTokens, CacheConfig, FormatId, KvCache, Modality, Rows};
use kvbits::rng::{Rng, rel_err};

/// Rows `[n][h][d]` with a few channels 5-20x larger (outliers make pivots and wide ranges).
fn rows(rng: &mut Rng, n: usize, h: usize, d: usize) -> Vec<f32> {
    (0..n * h * d)
        .map(|i| {
            let big = if i % d % 17 == 3 { 8.0 } else { 1.0 };
            let spike = if rng.below(997) == 0 { 12.0 } else { 1.0 };
            rng.normal() * big * spike
        })
        .collect()
}

/// The caches a host would make: every preset and the plain pairs, small blocks so that
/// spans cross several.
fn configs(h: usize, d: usize) -> Vec<(String, CacheConfig)> {
    let mut out: Vec<(String, CacheConfig)> = CacheConfig::PRESETS
        .iter()
        .map(|p| {
            (
                p.to_string(),
                CacheConfig::preset(p, 2, h, d).expect("preset"),
            )
        })
        .collect();
    for f in [FormatId::F16, FormatId::Q8_0, FormatId::Q4_0] {
        out.push((f.to_string(), CacheConfig::pair(f, f, 2, h, d)));
    }
    for (_, c) in &mut out {
        c.block_tokens = BlockTokens::Fixed(64);
    }
    out
}

/// Both caches, fed the same appends.
struct Twin {
    cpu: KvCache,
    dev: DeviceCache,
    h: usize,
    d: usize,
}

impl Twin {
    fn append(&mut self, rng: &mut Rng, n: usize, modality: Modality, f16_rows: bool, s: &Stream) {
        let (h, d) = (self.h, self.d);
        let sal: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
        let saliency = (modality == Modality::Visual).then_some(&sal[..]);
        for layer in 0..self.cpu.n_layer() {
            let (k, v) = (rows(rng, n, h, d), rows(rng, n, h, d));
            if f16_rows {
                let (k, v): (Vec<f16>, Vec<f16>) = (
                    k.iter().map(|&x| f16::from_f32(x)).collect(),
                    v.iter().map(|&x| f16::from_f32(x)).collect(),
                );
                let (dk, dv) = (
                    DeviceBuffer::from_slice(&k, s).unwrap(),
                    DeviceBuffer::from_slice(&v, s).unwrap(),
                );
                self.cpu
                    .append(layer, Rows::F16(&k), Rows::F16(&v), n, modality, saliency)
                    .expect("cpu append");
                self.dev
                    .append(layer, &dk, &dv, true, n, modality, saliency, s)
                    .expect("device append");
            } else {
                let (dk, dv) = (
                    DeviceBuffer::from_slice(&k, s).unwrap(),
                    DeviceBuffer::from_slice(&v, s).unwrap(),
                );
                self.cpu
                    .append(layer, Rows::F32(&k), Rows::F32(&v), n, modality, saliency)
                    .expect("cpu append");
                self.dev
                    .append(layer, &dk, &dv, false, n, modality, saliency, s)
                    .expect("device append");
            }
        }
    }

    /// Ledger and bytes equal; decode and dequantize of the device match the CPU's on the
    /// device's own bytes.
    fn check(&mut self, rng: &mut Rng, name: &str, s: &Stream) {
        let host = self.dev.to_host(s).expect("to host");
        let (h, d) = (self.h, self.d);
        for layer in 0..self.cpu.n_layer() {
            assert_eq!(
                host.blocks(layer),
                self.cpu.blocks(layer),
                "{name}: blocks of layer {layer}"
            );
            assert_eq!(
                host.n_residual(layer),
                self.cpu.n_residual(layer),
                "{name}: residual"
            );
            let n = self.cpu.n_tokens(layer);
            // Dequantized rows: the device's bytes equal the CPU's (k1_5_mix keys may differ
            // in a rounding tie of the FFT, so compare the rows, not the bytes).
            let (mut ck, mut cv) = (vec![f16::ZERO; n * h * d], vec![f16::ZERO; n * h * d]);
            self.cpu.dequantize(layer, 0, n, &mut ck, &mut cv).unwrap();
            let (mut hk, mut hv) = (ck.clone(), cv.clone());
            host.dequantize(layer, 0, n, &mut hk, &mut hv).unwrap();
            let f = |x: &[f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            let key_err = rel_err(&f(&hk), &f(&ck));
            let exact_keys = self.cpu.config().k_visual != FormatId::K1_5Mix;
            assert!(
                if exact_keys { hk == ck } else { key_err < 1e-3 },
                "{name}: layer {layer} keys differ from the CPU's (rel. error {key_err:.2e})"
            );
            assert!(
                hv == cv,
                "{name}: layer {layer} values differ from the CPU's"
            );

            // Device dequantize of a random sub-range against the host copy's.
            let first = rng.below(n);
            let m = 1 + rng.below(n - first);
            let out_k = DeviceBuffer::new(m * h * d * 2).unwrap();
            let out_v = DeviceBuffer::new(m * h * d * 2).unwrap();
            out_k.fill(0xff, s).unwrap();
            out_v.fill(0xff, s).unwrap();
            // SAFETY: both outputs hold m rows of h * d f16.
            unsafe {
                self.dev
                    .dequantize_raw(layer, first, m, out_k.as_ptr(), out_v.as_ptr(), s)
                    .expect("device dequantize");
            }
            let (mut gk, mut gv) = (vec![f16::ZERO; m * h * d], vec![f16::ZERO; m * h * d]);
            out_k.download(&mut gk, 0, s).unwrap();
            out_v.download(&mut gv, 0, s).unwrap();
            let range = first * h * d..(first + m) * h * d;
            assert!(
                gk == hk[range.clone()],
                "{name}: device dequantize of keys {first}+{m}"
            );
            assert!(
                gv == hv[range],
                "{name}: device dequantize of values {first}+{m}"
            );

            // Decode attention, GQA 7:1.
            let n_head = 7 * h;
            let q: Vec<f32> = (0..n_head * d).map(|_| rng.normal()).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let mut want = vec![0f32; n_head * d];
            host.attention_decode(layer, &q, n_head, &mut want, scale)
                .unwrap();
            let dq = DeviceBuffer::from_slice(&q, s).unwrap();
            let out = DeviceBuffer::new(q.len() * 4).unwrap();
            out.fill(0xff, s).unwrap();
            self.dev
                .attention_decode(layer, &dq, &out, n_head, scale, s)
                .expect("device decode");
            let mut got = vec![0f32; q.len()];
            out.download(&mut got, 0, s).unwrap();
            let err = rel_err(&got, &want);
            assert!(
                err < 1e-3,
                "{name}: layer {layer} decode rel. error {err:.2e}"
            );
        }
        let (mh, mc) = (self.dev.memory(), self.cpu.memory());
        assert_eq!(
            (mh.codes, mh.meta, mh.residual),
            (mc.codes, mc.meta, mc.residual),
            "{name}: memory"
        );
    }
}

#[test]
fn device_cache_matches_the_cpu_cache() {
    let Some(s) = gpu() else { return };
    let mut rng = Rng::new(common::seed("device_cache_matches_the_cpu_cache"));
    for (h, d) in [(4, 128), (2, 64), (1, 80)] {
        for (name, cfg) in configs(h, d) {
            let name = format!("{name} h{h} d{d}");
            eprintln!("{name}");
            let mut t = Twin {
                cpu: KvCache::new(cfg.clone()).unwrap(),
                dev: DeviceCache::new(cfg, 0).unwrap(),
                h,
                d,
            };
            // A system prompt, an image, a question dripped token by token, a second image
            // (large enough to grow the arena), more text.
            t.append(&mut rng, 37, Modality::Text, false, &s);
            t.append(&mut rng, 300, Modality::Visual, true, &s);
            t.check(&mut rng, &name, &s);
            for _ in 0..20 {
                t.append(&mut rng, 1, Modality::Text, false, &s);
            }
            t.append(&mut rng, 1200, Modality::Visual, false, &s);
            t.append(&mut rng, 150, Modality::Text, true, &s);
            t.check(&mut rng, &name, &s);
            t.cpu.flush();
            t.dev.flush(&s).unwrap();
            t.check(&mut rng, &name, &s);
        }
    }
}

/// Enough calibrated spans for one work item each (one-pass calibration), with text blocks
/// and the residual in items of their own: the same attention as the CPU.
#[test]
fn many_calibrated_spans_with_text_and_residual_match_the_cpu() {
    let Some(s) = gpu() else { return };
    let mut rng = Rng::new(common::seed(
        "many_calibrated_spans_with_text_and_residual_match_the_cpu",
    ));
    let (h, d) = (4, 128);
    let mut cfg = CacheConfig::preset("calibquant", 1, h, d).unwrap();
    cfg.block_tokens = BlockTokens::Fixed(64);
    let mut t = Twin {
        cpu: KvCache::new(cfg.clone()).unwrap(),
        dev: DeviceCache::new(cfg, 0).unwrap(),
        h,
        d,
    };
    t.append(&mut rng, 50, Modality::Text, false, &s);
    for _ in 0..48 {
        let (image, text) = (96 + rng.below(100), 1 + rng.below(40));
        t.append(&mut rng, image, Modality::Visual, true, &s);
        t.append(&mut rng, text, Modality::Text, false, &s);
    }
    t.check(&mut rng, "calibquant, 48 spans", &s);
}

#[test]
fn a_snapshot_reloads_to_the_same_attention() {
    let Some(s) = gpu() else { return };
    let mut rng = Rng::new(common::seed("a_snapshot_reloads_to_the_same_attention"));
    let (h, d) = (4, 128);
    for p in CacheConfig::PRESETS {
        let cfg = CacheConfig::preset(p, 2, h, d).unwrap();
        let mut t = Twin {
            cpu: KvCache::new(cfg.clone()).unwrap(),
            dev: DeviceCache::new(cfg, 0).unwrap(),
            h,
            d,
        };
        t.append(&mut rng, 20, Modality::Text, false, &s);
        t.append(&mut rng, 700, Modality::Visual, true, &s);
        t.append(&mut rng, 9, Modality::Text, false, &s);
        let path =
            std::env::temp_dir().join(format!("kvbits-device-{p}-{}.gguf", std::process::id()));
        t.dev.to_host(&s).unwrap().save(&path).unwrap();
        let mut back = DeviceCache::from_host(&KvCache::load(&path).unwrap(), 0, &s).unwrap();
        std::fs::remove_file(&path).unwrap();
        let n_head = 7 * h;
        let q = DeviceBuffer::from_slice(&rng.normals(n_head * d), &s).unwrap();
        for layer in 0..2 {
            let mut outs = Vec::new();
            for cache in [&mut t.dev, &mut back] {
                let out = DeviceBuffer::new(n_head * d * 4).unwrap();
                cache
                    .attention_decode(layer, &q, &out, n_head, 0.1, &s)
                    .unwrap();
                let mut got = vec![0f32; n_head * d];
                out.download(&mut got, 0, &s).unwrap();
                outs.push(got);
            }
            assert!(
                outs[0] == outs[1],
                "{p}: layer {layer} attention changed after save and load"
            );
        }
        // Appends go on after a reload as before it.
        t.append(&mut rng, 130, Modality::Text, false, &s);
        assert_eq!(t.dev.n_tokens(0), 859);
    }
}

#[test]
fn bad_input_is_refused_and_leaves_the_cache_as_it_was() {
    let Some(s) = gpu() else { return };
    let (h, d) = (2, 64);
    let cfg = CacheConfig::preset("kivi2", 1, h, d).unwrap();
    let mut dev = DeviceCache::new(cfg.clone(), 0).unwrap();
    let good = DeviceBuffer::from_slice(&vec![0.5f32; 10 * h * d], &s).unwrap();
    dev.append(0, &good, &good, false, 10, Modality::Text, None, &s)
        .unwrap();
    for bad_value in [f32::NAN, f32::INFINITY, 70000.0] {
        let mut x = vec![0.5f32; 10 * h * d];
        x[777] = bad_value;
        let bad = DeviceBuffer::from_slice(&x, &s).unwrap();
        let e = dev
            .append(0, &good, &bad, false, 10, Modality::Text, None, &s)
            .unwrap_err();
        assert!(e.to_string().contains("f16 range"), "{e}");
        assert_eq!(dev.n_tokens(0), 10);
    }
    assert!(
        dev.append(1, &good, &good, false, 10, Modality::Text, None, &s)
            .is_err()
    );
    assert!(
        dev.append(0, &good, &good, false, 11, Modality::Text, None, &s)
            .is_err()
    );
    assert!(
        dev.append(0, &good, &good, false, 0, Modality::Text, None, &s)
            .is_err()
    );
    let q = DeviceBuffer::new(3 * d * 4).unwrap();
    assert!(
        dev.attention_decode(0, &q, &q, 3, 0.1, &s).is_err(),
        "3 heads over 2 KV heads"
    );
    assert!(DeviceCache::new(cfg.clone(), 1 << 20).is_err());
    let odd = CacheConfig {
        head_dim: 48,
        ..cfg
    };
    assert!(DeviceCache::new(odd, 0).is_err());
    // The cache still works.
    let q = DeviceBuffer::from_slice(&vec![0.1f32; 2 * h * d], &s).unwrap();
    let out = DeviceBuffer::new(2 * h * d * 4).unwrap();
    dev.attention_decode(0, &q, &out, 2 * h, 0.1, &s).unwrap();
    let mut got = vec![0f32; 2 * h * d];
    out.download(&mut got, 0, &s).unwrap();
    assert!(
        got.iter().all(|x| (x - 0.5).abs() < 1e-2),
        "attention over constant values"
    );
}
