//! The C ABI called as C calls it: every status path, attention and dequantization against
//! `KvCache`'s own, f16 against f32 appends, snapshots (bit-identical after loading; truncated
//! or damaged files are errors), the ggml row functions against the formats and against
//! ggml's reference formulas written out here, and the thread-local error message.
//! Inputs are fresh random each run; the seed is printed (replay with KVBITS_SEED).

mod common;

use std::ffi::{CStr, CString, c_void};
use std::ptr::{null, null_mut};

use common::{TempPath, seed};
use half::f16;
use kvbits::ffi::*;
use kvbits::kv::{CacheConfig, FormatId, KvCache, Modality, QuantParams, Role, Rows, Shape};
use kvbits::rng::Rng;

fn last_error() -> String {
    // SAFETY: kvb_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(kvb_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts `status` and that the error message mentions `phrase`.
#[track_caller]
fn expect(status: i32, want: i32, phrase: &str) {
    assert_eq!(
        status,
        want,
        "status {status}, expected {want}: {}",
        last_error()
    );
    let msg = last_error();
    assert!(
        msg.contains(phrase),
        "message {msg:?} does not mention {phrase:?}"
    );
}

#[track_caller]
fn ok(status: i32) {
    assert_eq!(status, KVB_OK, "{}", last_error());
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn params(
    preset: Option<&str>,
    n_layer: i32,
    n_head: i32,
    n_head_kv: i32,
    d: i32,
) -> kvb_cache_params {
    let mut p = std::mem::MaybeUninit::uninit();
    // SAFETY: valid pointers.
    let mut p = unsafe {
        kvb_cache_params_default(p.as_mut_ptr());
        p.assume_init()
    };
    if let Some(name) = preset {
        // SAFETY: valid pointers.
        ok(unsafe { kvb_cache_preset(c(name).as_ptr(), &mut p) });
    }
    (p.n_layer, p.n_head, p.n_head_kv, p.head_dim) = (n_layer, n_head, n_head_kv, d);
    p
}

/// An owned cache handle, freed on drop.
struct Cache(*mut kvb_cache);

impl Cache {
    fn new(p: &kvb_cache_params) -> Cache {
        let mut c = null_mut();
        // SAFETY: valid pointers.
        ok(unsafe { kvb_cache_new(p, &mut c) });
        Cache(c)
    }

    fn load(path: &std::path::Path) -> Result<Cache, i32> {
        let mut out = null_mut();
        let path = c(path.to_str().unwrap());
        // SAFETY: valid pointers.
        match unsafe { kvb_cache_load(path.as_ptr(), &mut out) } {
            KVB_OK => Ok(Cache(out)),
            s => {
                assert!(out.is_null(), "a failed load must leave *out NULL");
                Err(s)
            }
        }
    }

    fn append(&self, layer: i32, k: &[f32], v: &[f32], n: i32, m: i32, sal: Option<&[f32]>) -> i32 {
        let sal = sal.map_or(null(), |s| s.as_ptr());
        // SAFETY: lengths as the test made them.
        unsafe { kvb_cache_append(self.0, layer, k.as_ptr(), v.as_ptr(), n, m, sal) }
    }

    fn attn(&self, layer: i32, q: &[f32], scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        // SAFETY: lengths as the test made them.
        ok(unsafe { kvb_cache_attn_decode(self.0, layer, q.as_ptr(), out.as_mut_ptr(), scale) });
        out
    }

    fn n_tokens(&self, layer: i32) -> i64 {
        // SAFETY: a live cache.
        unsafe { kvb_cache_n_tokens(self.0, layer) }
    }

    fn save(&self, path: &std::path::Path) {
        // SAFETY: valid pointers.
        ok(unsafe { kvb_cache_save(self.0, c(path.to_str().unwrap()).as_ptr()) });
    }

    fn memory(&self) -> [f64; 6] {
        let mut m = kvb_memory {
            bytes_codes: 0,
            bytes_meta: 0,
            bytes_residual: 0,
            bytes_total: 0,
            bits_k: 0.0,
            bits_v: 0.0,
        };
        // SAFETY: valid pointers.
        ok(unsafe { kvb_cache_memory(self.0, &mut m) });
        [
            m.bytes_codes as f64,
            m.bytes_meta as f64,
            m.bytes_residual as f64,
            m.bytes_total as f64,
            m.bits_k,
            m.bits_v,
        ]
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        // SAFETY: made by kvb_cache_new or kvb_cache_load, freed once.
        unsafe { kvb_cache_free(self.0) }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One append of a script: tokens, modality, with saliency, one token per call.
type Step = (usize, i32, bool, bool);

/// Text, a video-like visual span with saliency, text dripped one token at a time, a
/// second visual span without saliency, more text: every path of the residual and the blocks.
const SCRIPT: [Step; 5] = [
    (40, KVB_MODALITY_TEXT, false, false),
    (300, KVB_MODALITY_VISUAL, true, false),
    (20, KVB_MODALITY_TEXT, false, true),
    (150, KVB_MODALITY_VISUAL, false, false),
    (90, KVB_MODALITY_TEXT, false, false),
];

/// Random rows of `n` tokens with a few outlier channels, as real keys have.
fn rows(rng: &mut Rng, n: usize, row: usize) -> Vec<f32> {
    (0..n * row)
        .map(|i| rng.normal() * if i % 37 == 3 { 8.0 } else { 1.0 })
        .collect()
}

/// Runs `steps` on every layer of the C cache and, when given, of a `KvCache`.
fn fill(
    rng: &mut Rng,
    c: &Cache,
    mut rust: Option<&mut KvCache>,
    p: &kvb_cache_params,
    steps: &[Step],
) {
    let row = (p.n_head_kv * p.head_dim) as usize;
    for &(n, m, salient, drip) in steps {
        for layer in 0..p.n_layer {
            let k = rows(rng, n, row);
            let v = rows(rng, n, row);
            let sal: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            let sal = salient.then_some(&sal[..]);
            let chunks: Vec<(usize, usize)> = if drip {
                (0..n).map(|t| (t, 1)).collect()
            } else {
                vec![(0, n)]
            };
            for (t, len) in chunks {
                let (k, v) = (&k[t * row..(t + len) * row], &v[t * row..(t + len) * row]);
                let s = sal.map(|s| &s[t..t + len]);
                ok(c.append(layer, k, v, len as i32, m, s));
                if let Some(r) = rust.as_deref_mut() {
                    let modality = [Modality::Text, Modality::Visual][m as usize];
                    r.append(layer as usize, Rows::F32(k), Rows::F32(v), len, modality, s)
                        .unwrap();
                }
            }
        }
    }
}

const PRESETS: [&str; 4] = ["calibquant", "vidkv", "akvq", "kivi2"];

#[test]
fn argument_errors_have_their_status_and_a_message() {
    let p = params(Some("kivi2"), 2, 8, 2, 64);
    let cache = Cache::new(&p);
    let row = 2 * 64;
    let k = vec![0.5f32; 4 * row];
    let mut out = null_mut();
    // SAFETY: every call below passes NULL or valid pointers, as each case intends.
    unsafe {
        // NULLs.
        expect(
            kvb_cache_new(null(), &mut out),
            KVB_ERR_INVALID_ARGUMENT,
            "params is NULL",
        );
        expect(
            kvb_cache_new(&p, null_mut()),
            KVB_ERR_INVALID_ARGUMENT,
            "out is NULL",
        );
        expect(
            cache_append_null(&cache, &k),
            KVB_ERR_INVALID_ARGUMENT,
            "v is NULL",
        );
        expect(
            kvb_cache_append(null_mut(), 0, k.as_ptr(), k.as_ptr(), 4, 0, null()),
            KVB_ERR_INVALID_ARGUMENT,
            "cache is NULL",
        );
        expect(
            kvb_cache_preset(null(), null_mut()),
            KVB_ERR_INVALID_ARGUMENT,
            "NULL",
        );
        expect(
            kvb_model_open(null(), &mut null_mut()),
            KVB_ERR_INVALID_ARGUMENT,
            "gguf_path is NULL",
        );
        expect(
            kvb_cache_memory(cache.0, null_mut()),
            KVB_ERR_INVALID_ARGUMENT,
            "out is NULL",
        );
        expect(
            kvb_cache_save(cache.0, null()),
            KVB_ERR_INVALID_ARGUMENT,
            "path is NULL",
        );
        // Freeing NULL is a no-op.
        kvb_cache_free(null_mut());
        kvb_model_free(null_mut());

        // Layers, counts, modality.
        for layer in [-1, 2, i32::MAX] {
            expect(
                cache.append(layer, &k, &k, 4, 0, None),
                KVB_ERR_INVALID_ARGUMENT,
                "out of range",
            );
            assert_eq!(cache.n_tokens(layer), -1);
            assert!(last_error().contains("out of range"));
        }
        for n in [0, -3, i32::MIN] {
            expect(
                cache.append(0, &k, &k, n, 0, None),
                KVB_ERR_INVALID_ARGUMENT,
                "n_tokens",
            );
        }
        for m in [2, -1] {
            expect(
                cache.append(0, &k, &k, 4, m, None),
                KVB_ERR_INVALID_ARGUMENT,
                "modality",
            );
        }
        // Values a cache cannot hold leave it as it was.
        let mut bad = k.clone();
        bad[row + 5] = f32::NAN;
        expect(
            cache.append(0, &bad, &k, 4, 0, None),
            KVB_ERR_INVALID_ARGUMENT,
            "non-finite",
        );
        bad[row + 5] = 1e6;
        expect(
            cache.append(0, &k, &bad, 4, 0, None),
            KVB_ERR_INVALID_ARGUMENT,
            "f16 range",
        );
        assert_eq!(cache.n_tokens(0), 0);
        let sal = [0.0, f32::INFINITY, 0.0, 0.0];
        expect(
            cache.append(0, &k, &k, 4, 1, Some(&sal)),
            KVB_ERR_INVALID_ARGUMENT,
            "saliency",
        );
        // Misaligned rows.
        let raw = k.as_ptr().cast::<u8>().add(1).cast::<f32>();
        expect(
            kvb_cache_append(cache.0, 0, raw, k.as_ptr(), 1, 0, null()),
            KVB_ERR_INVALID_ARGUMENT,
            "aligned",
        );

        // Attention and dequantization.
        let q = vec![0.1f32; 8 * 64];
        let mut o = vec![0f32; 8 * 64];
        expect(
            kvb_cache_attn_decode(cache.0, 0, q.as_ptr(), o.as_mut_ptr(), 0.125),
            KVB_ERR_INVALID_ARGUMENT,
            "no cached tokens",
        );
        ok(cache.append(0, &k, &k, 4, 0, None));
        expect(
            kvb_cache_attn_decode(cache.0, 0, q.as_ptr(), o.as_mut_ptr(), f32::NAN),
            KVB_ERR_INVALID_ARGUMENT,
            "finite",
        );
        expect(
            kvb_cache_attn_decode(cache.0, 0, q.as_ptr(), null_mut(), 0.1),
            KVB_ERR_INVALID_ARGUMENT,
            "out is NULL",
        );
        let mut h = vec![0u16; 4 * row];
        for (first, n, phrase) in [
            (0, 5, "out of range"),
            (-1, 1, "first"),
            (0, 0, "n is 0"),
            (i64::MAX, 1, "out of range"),
        ] {
            expect(
                kvb_cache_dequantize(cache.0, 0, first, n, h.as_mut_ptr(), h.as_mut_ptr()),
                KVB_ERR_INVALID_ARGUMENT,
                phrase,
            );
        }

        // Parameters.
        type Edit = fn(&mut kvb_cache_params);
        let cases: [(Edit, i32, &str); 10] = [
            (
                |p| p.type_k_text = 99,
                KVB_ERR_INVALID_ARGUMENT,
                "type_k_text = 99",
            ),
            (
                |p| p.type_v_visual = -1,
                KVB_ERR_INVALID_ARGUMENT,
                "type_v_visual",
            ),
            (
                |p| p.type_k_visual = KVB_TYPE_V1_58_TERN,
                KVB_ERR_INVALID_ARGUMENT,
                "value-only",
            ),
            (|p| p.n_head = 7, KVB_ERR_INVALID_ARGUMENT, "multiple"),
            (|p| p.n_layer = 0, KVB_ERR_INVALID_ARGUMENT, "n_layer = 0"),
            (|p| p.head_dim = 100, KVB_ERR_UNSUPPORTED, "head dim 100"),
            (
                |p| p.block_tokens = 8,
                KVB_ERR_INVALID_ARGUMENT,
                "block_tokens 8",
            ),
            (
                |p| p.protect_fraction = f32::NAN,
                KVB_ERR_INVALID_ARGUMENT,
                "protect_fraction",
            ),
            (
                |p| p.calibrate = 2,
                KVB_ERR_INVALID_ARGUMENT,
                "calibrate = 2",
            ),
            (|p| p.device = 7, KVB_ERR_INVALID_ARGUMENT, "device = 7"),
        ];
        for (edit, status, phrase) in cases {
            let mut bad_p = p;
            edit(&mut bad_p);
            expect(kvb_cache_new(&bad_p, &mut out), status, phrase);
        }
        assert!(out.is_null());
        expect(
            kvb_cache_preset(c("fast").as_ptr(), &mut p.clone()),
            KVB_ERR_INVALID_ARGUMENT,
            "calibquant, vidkv",
        );

        // Types.
        let mut id = -5;
        expect(
            kvb_type_from_name(c("q3_0").as_ptr(), &mut id),
            KVB_ERR_INVALID_ARGUMENT,
            "q1_calib",
        );
        assert_eq!(id, -5);
        assert!(kvb_type_name(KVB_TYPE_COUNT).is_null());
        assert!(last_error().contains("not a cache type id"));
        assert!(kvb_type_name(-1).is_null());

        // Files.
        let missing = c("/nonexistent/kvbits/model.gguf");
        expect(
            kvb_model_open(missing.as_ptr(), &mut null_mut()),
            KVB_ERR_IO,
            "/nonexistent/kvbits/model.gguf",
        );
        expect(
            kvb_cache_load(missing.as_ptr(), &mut out),
            KVB_ERR_IO,
            "model.gguf",
        );
        let not_gguf = TempPath::new("not-gguf");
        std::fs::write(&not_gguf.0, b"hello, this is not a GGUF file at all").unwrap();
        let path = c(not_gguf.0.to_str().unwrap());
        expect(
            kvb_model_open(path.as_ptr(), &mut null_mut()),
            KVB_ERR_FORMAT,
            "not a GGUF file",
        );
        expect(
            kvb_cache_load(path.as_ptr(), &mut out),
            KVB_ERR_FORMAT,
            "not a GGUF file",
        );
        expect(
            kvb_cache_save(cache.0, c("/nonexistent/dir/x.gguf").as_ptr()),
            KVB_ERR_IO,
            "/nonexistent/dir",
        );
    }
}

/// # Safety
/// `k` holds four rows of the cache's shape.
unsafe fn cache_append_null(cache: &Cache, k: &[f32]) -> i32 {
    // SAFETY: the caller's contract; `v` is NULL on purpose.
    unsafe { kvb_cache_append(cache.0, 0, k.as_ptr(), null(), 4, 0, null()) }
}

#[test]
fn cuda_calls_without_cuda_or_on_a_cpu_cache_are_refused() {
    let mut p = params(None, 1, 2, 2, 64);
    p.device = KVB_DEVICE_CUDA;
    let mut out = null_mut();
    let cache = Cache::new(&params(None, 1, 2, 2, 64));
    let q = [0f32; 128];
    let mut o = [0f32; 128];
    let mut h = [0u16; 128];
    let s = null_mut::<c_void>();
    let (want, phrase) = if kvb_has_cuda() == 1 {
        (KVB_ERR_INVALID_ARGUMENT, "take a KVB_DEVICE_CUDA cache")
    } else {
        (KVB_ERR_NO_CUDA, "without CUDA")
    };
    // SAFETY: valid pointers of the sizes each call reads.
    unsafe {
        if kvb_has_cuda() == 0 {
            expect(kvb_cache_new(&p, &mut out), KVB_ERR_NO_CUDA, "without CUDA");
            assert!(out.is_null());
        }
        p.device_id = -1;
        expect(
            kvb_cache_new(&p, &mut out),
            KVB_ERR_INVALID_ARGUMENT,
            "device_id",
        );
        expect(
            kvb_cache_append_async(cache.0, 0, q.as_ptr(), q.as_ptr(), 1, 0, null(), s),
            want,
            phrase,
        );
        let hq = h.as_ptr();
        expect(
            kvb_cache_append_f16_async(cache.0, 0, hq, hq, 1, 0, null(), s),
            want,
            phrase,
        );
        expect(
            kvb_cache_attn_decode_async(cache.0, 0, q.as_ptr(), o.as_mut_ptr(), 1.0, s),
            want,
            phrase,
        );
        let hm = h.as_mut_ptr();
        expect(
            kvb_cache_dequantize_async(cache.0, 0, 0, 1, hm, hm, s),
            want,
            phrase,
        );
    }
    assert_eq!(
        cache.n_tokens(0),
        0,
        "an async call must not touch a CPU cache"
    );
}

#[test]
fn type_ids_and_names_follow_the_format_table() {
    let ids = [
        KVB_TYPE_F16,
        KVB_TYPE_Q8_0,
        KVB_TYPE_Q4_0,
        KVB_TYPE_KIVI2,
        KVB_TYPE_Q1_CALIB,
        KVB_TYPE_K1_5_MIX,
        KVB_TYPE_V1_58_TERN,
        KVB_TYPE_Q2_HAD,
        KVB_TYPE_Q4_HAD,
    ];
    assert_eq!(KVB_TYPE_COUNT as usize, FormatId::ALL.len());
    for (f, id) in FormatId::ALL.into_iter().zip(ids) {
        assert_eq!(f as i32, id);
        // SAFETY: static strings and valid pointers.
        unsafe {
            assert_eq!(
                CStr::from_ptr(kvb_type_name(id)).to_str().unwrap(),
                f.name()
            );
            let mut got = -1;
            ok(kvb_type_from_name(c(f.name()).as_ptr(), &mut got));
            assert_eq!(got, id);
        }
    }
    // SAFETY: a static string.
    let v = unsafe { CStr::from_ptr(kvb_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn presets_and_params_round_trip_to_the_rust_config() {
    for name in PRESETS {
        let p = params(Some(name), 3, 12, 4, 96);
        let want = CacheConfig::preset(name, 3, 4, 96).unwrap();
        let cache = Cache::new(&p);
        let mut got = params(None, 0, 0, 0, 0);
        // SAFETY: valid pointers.
        ok(unsafe { kvb_cache_get_params(cache.0, &mut got) });
        assert_eq!(
            (got.n_layer, got.n_head, got.n_head_kv, got.head_dim),
            (3, 12, 4, 96)
        );
        let types = [want.k_text, want.v_text, want.k_visual, want.v_visual].map(|f| f as i32);
        assert_eq!(
            [
                got.type_k_text,
                got.type_v_text,
                got.type_k_visual,
                got.type_v_visual
            ],
            types,
            "{name}"
        );
        assert_eq!(got.calibrate, want.calibrate as i32, "{name}");
        assert_eq!(got.protect_fraction, want.protect_fraction, "{name}");
        assert_eq!(got.pivot_factor, want.pivot_factor.unwrap_or(0.0), "{name}");
        assert_eq!(got.recent_f16 as usize, want.recent_f16, "{name}");
        assert_eq!(got.block_tokens, 128);
    }
    // Calibration defaults on exactly where q1_calib holds visual keys.
    let mut p = params(None, 1, 2, 2, 64);
    p.type_k_visual = KVB_TYPE_Q1_CALIB;
    let mut got = p;
    // SAFETY: valid pointers.
    ok(unsafe { kvb_cache_get_params(Cache::new(&p).0, &mut got) });
    assert_eq!(got.calibrate, 1);
    p.calibrate = 0;
    // SAFETY: valid pointers.
    ok(unsafe { kvb_cache_get_params(Cache::new(&p).0, &mut got) });
    assert_eq!(got.calibrate, 0);
}

#[test]
fn model_shape_from_the_demo_gguf() {
    let dir = TempPath::new("demo-dir");
    let (model, _) = kvbits::model::demo::write_demo(&dir.0).unwrap();
    let mut m = null_mut();
    let path = c(model.to_str().unwrap());
    // SAFETY: valid pointers; the model is freed once at the end.
    unsafe {
        ok(kvb_model_open(path.as_ptr(), &mut m));
        let mut s = std::mem::zeroed::<kvb_shape>();
        ok(kvb_model_shape(m, &mut s));
        assert_eq!(
            (
                s.n_layer,
                s.n_head,
                s.n_head_kv_max,
                s.head_dim_k,
                s.head_dim_v
            ),
            (28, 28, 4, 128, 128)
        );
        assert_eq!(s.context_length, 128000);
        assert_eq!(std::slice::from_raw_parts(s.n_head_kv, 28), &[4; 28]);
        assert_eq!(
            CStr::from_ptr(kvb_model_architecture(m)).to_str().unwrap(),
            "qwen2vl"
        );
        let mut p = params(Some("akvq"), 0, 0, 0, 0);
        ok(kvb_cache_params_for_model(m, &mut p));
        assert_eq!(
            (p.n_layer, p.n_head, p.n_head_kv, p.head_dim),
            (28, 28, 4, 128)
        );
        expect(
            kvb_model_shape(m, null_mut()),
            KVB_ERR_INVALID_ARGUMENT,
            "out is NULL",
        );
        kvb_model_free(m);
        // The mmproj is not an LLM.
        let mmproj = c(dir
            .0
            .join(kvbits::model::demo::DEMO_MMPROJ)
            .to_str()
            .unwrap());
        expect(
            kvb_model_open(mmproj.as_ptr(), &mut m),
            KVB_ERR_INVALID_ARGUMENT,
            "mmproj",
        );
        assert!(m.is_null());
        // Nor is a model a cache snapshot.
        let mut out = null_mut();
        expect(
            kvb_cache_load(path.as_ptr(), &mut out),
            KVB_ERR_FORMAT,
            "not a kvbits cache snapshot",
        );
    }
    let _ = std::fs::remove_dir_all(&dir.0);
}

/// Every preset and a few pairs: the C cache's attention and dequantization equal `KvCache`'s,
/// bit for bit, and so do the memory reports.
#[test]
fn decode_and_dequantize_equal_the_rust_cache() {
    let mut rng = Rng::new(seed("decode_and_dequantize_equal_the_rust_cache"));
    let (nl, nh, hk, d) = (2, 8, 2, 128);
    let mut configs: Vec<(kvb_cache_params, CacheConfig)> = PRESETS
        .iter()
        .map(|&n| {
            (
                params(Some(n), nl, nh, hk, d),
                CacheConfig::preset(n, 2, 2, 128).unwrap(),
            )
        })
        .collect();
    for (k, v) in [
        (FormatId::Q8_0, FormatId::Q4_0),
        (FormatId::Q2Had, FormatId::Q1Calib),
    ] {
        let mut p = params(None, nl, nh, hk, d);
        (
            p.type_k_text,
            p.type_k_visual,
            p.type_v_text,
            p.type_v_visual,
        ) = (k as i32, k as i32, v as i32, v as i32);
        p.block_tokens = KVB_BLOCK_TOKENS_SPAN;
        let mut cfg = CacheConfig::pair(k, v, 2, 2, 128);
        cfg.block_tokens = kvbits::kv::BlockTokens::All;
        configs.push((p, cfg));
    }
    for (p, cfg) in configs {
        let what = cfg.to_string();
        let cache = Cache::new(&p);
        let mut rust = KvCache::new(cfg).unwrap();
        fill(&mut rng, &cache, Some(&mut rust), &p, &SCRIPT);
        for layer in 0..nl {
            assert_eq!(cache.n_tokens(layer), 600);
            for _ in 0..3 {
                let q = rows(&mut rng, 1, (nh * d) as usize);
                let mut want = vec![0f32; q.len()];
                rust.attention_decode(layer as usize, &q, nh as usize, &mut want, 0.088)
                    .unwrap();
                assert_eq!(
                    bits(&cache.attn(layer, &q, 0.088)),
                    bits(&want),
                    "{what}, layer {layer}"
                );
            }
            let (first, n) = (rng.below(500), 1 + rng.below(100));
            let len = n * (hk * d) as usize;
            let (mut kc, mut vc) = (vec![0u16; len], vec![0u16; len]);
            // SAFETY: buffers of the size asked for.
            ok(unsafe {
                kvb_cache_dequantize(
                    cache.0,
                    layer,
                    first as i64,
                    n as i64,
                    kc.as_mut_ptr(),
                    vc.as_mut_ptr(),
                )
            });
            let (mut kr, mut vr) = (vec![f16::ZERO; len], vec![f16::ZERO; len]);
            rust.dequantize(layer as usize, first, n, &mut kr, &mut vr)
                .unwrap();
            assert!(
                kc.iter().zip(&kr).all(|(a, b)| *a == b.to_bits()),
                "{what}: K tokens {first}+{n}"
            );
            assert!(
                vc.iter().zip(&vr).all(|(a, b)| *a == b.to_bits()),
                "{what}: V tokens {first}+{n}"
            );
        }
        let m = rust.memory();
        let want = [
            m.codes as f64,
            m.meta as f64,
            m.residual as f64,
            m.total as f64,
            m.bits_k,
            m.bits_v,
        ];
        assert_eq!(cache.memory(), want, "{what}");
        assert!(
            m.codes > 0 && m.total == m.codes + m.meta + m.residual,
            "{what}: {m:?}"
        );
    }
}

#[test]
fn f16_append_equals_f32_append() {
    let mut rng = Rng::new(seed("f16_append_equals_f32_append"));
    for name in PRESETS {
        let p = params(Some(name), 1, 4, 2, 64);
        let (a, b) = (Cache::new(&p), Cache::new(&p));
        let row = 2 * 64;
        for (n, m) in [
            (70, KVB_MODALITY_TEXT),
            (200, KVB_MODALITY_VISUAL),
            (3, KVB_MODALITY_TEXT),
        ] {
            let sal: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            // Values exactly representable in f16, so both appends hold the same numbers.
            let k: Vec<f16> = rows(&mut rng, n, row)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let v: Vec<f16> = rows(&mut rng, n, row)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let (k32, v32): (Vec<f32>, Vec<f32>) = (
                k.iter().map(|x| x.to_f32()).collect(),
                v.iter().map(|x| x.to_f32()).collect(),
            );
            let (k16, v16): (Vec<u16>, Vec<u16>) = (
                k.iter().map(|x| x.to_bits()).collect(),
                v.iter().map(|x| x.to_bits()).collect(),
            );
            ok(a.append(0, &k32, &v32, n as i32, m, Some(&sal)));
            // SAFETY: buffers of n rows.
            ok(unsafe {
                kvb_cache_append_f16(
                    b.0,
                    0,
                    k16.as_ptr(),
                    v16.as_ptr(),
                    n as i32,
                    m,
                    sal.as_ptr(),
                )
            });
        }
        let q = rows(&mut rng, 1, 4 * 64);
        assert_eq!(
            bits(&a.attn(0, &q, 0.125)),
            bits(&b.attn(0, &q, 0.125)),
            "{name}"
        );
        assert_eq!(a.memory(), b.memory(), "{name}");
    }
}

/// Every preset, and a pair with one block per span: the loaded cache attends bit for bit as
/// the saved one, reports the same memory and parameters, and goes on identically after more
/// appends.
#[test]
fn save_then_load_attends_bit_for_bit() {
    let mut rng = Rng::new(seed("save_then_load_attends_bit_for_bit"));
    let mut all: Vec<kvb_cache_params> = PRESETS
        .iter()
        .map(|&n| params(Some(n), 2, 8, 2, 128))
        .collect();
    let mut span = params(None, 2, 8, 2, 128);
    (span.type_k_visual, span.type_v_visual, span.block_tokens) =
        (KVB_TYPE_K1_5_MIX, KVB_TYPE_KIVI2, KVB_BLOCK_TOKENS_SPAN);
    all.push(span);
    for p in all {
        let saved = Cache::new(&p);
        fill(&mut rng, &saved, None, &p, &SCRIPT);
        let file = TempPath::new("snapshot.gguf");
        saved.save(&file.0);
        let loaded = Cache::load(&file.0).unwrap_or_else(|s| panic!("load: {s} {}", last_error()));
        let check = |what: &str, rng: &mut Rng| {
            for layer in 0..2 {
                assert_eq!(saved.n_tokens(layer), loaded.n_tokens(layer));
                for _ in 0..3 {
                    let q = rows(rng, 1, 8 * 128);
                    assert_eq!(
                        bits(&saved.attn(layer, &q, 0.09)),
                        bits(&loaded.attn(layer, &q, 0.09)),
                        "{what} layer {layer}"
                    );
                }
            }
            assert_eq!(saved.memory(), loaded.memory(), "{what}");
        };
        check("after load", &mut rng);
        let (mut a, mut b) = (p, p);
        // SAFETY: valid pointers.
        unsafe {
            ok(kvb_cache_get_params(saved.0, &mut a));
            ok(kvb_cache_get_params(loaded.0, &mut b));
        }
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}

#[test]
fn loaded_cache_continues_like_the_saved_one() {
    let mut rng = Rng::new(seed("loaded_cache_continues_like_the_saved_one"));
    for name in PRESETS {
        let p = params(Some(name), 1, 4, 2, 64);
        let saved = Cache::new(&p);
        fill(&mut rng, &saved, None, &p, &SCRIPT[..3]);
        let file = TempPath::new("continue.gguf");
        saved.save(&file.0);
        let loaded = Cache::load(&file.0).unwrap();
        let s = rng.next_u64();
        fill(&mut Rng::new(s), &saved, None, &p, &SCRIPT[3..]);
        fill(&mut Rng::new(s), &loaded, None, &p, &SCRIPT[3..]);
        let q = rows(&mut rng, 1, 4 * 64);
        assert_eq!(
            bits(&saved.attn(0, &q, 0.1)),
            bits(&loaded.attn(0, &q, 0.1)),
            "{name}"
        );
        assert_eq!(saved.memory(), loaded.memory(), "{name}");
    }
}

/// Truncation at many offsets and random byte damage: an error (never a crash), or, where the
/// damage hit only alignment padding, a cache that attends exactly as the original.
#[test]
fn truncated_or_damaged_snapshots_are_errors() {
    let mut rng = Rng::new(seed("truncated_or_damaged_snapshots_are_errors"));
    let p = params(Some("vidkv"), 1, 4, 2, 64);
    let saved = Cache::new(&p);
    fill(&mut rng, &saved, None, &p, &SCRIPT[..3]);
    let file = TempPath::new("damage.gguf");
    saved.save(&file.0);
    let bytes = std::fs::read(&file.0).unwrap();
    let q = rows(&mut rng, 1, 4 * 64);
    let want = bits(&saved.attn(0, &q, 0.1));
    let damaged = TempPath::new("damaged.gguf");

    let mut cuts: Vec<usize> = (0..bytes.len().min(2048)).step_by(7).collect();
    cuts.extend((0..200).map(|_| rng.below(bytes.len())));
    for cut in cuts {
        std::fs::write(&damaged.0, &bytes[..cut]).unwrap();
        match Cache::load(&damaged.0) {
            Err(s) => assert_eq!(s, KVB_ERR_FORMAT, "cut at {cut}: {}", last_error()),
            Ok(_) => panic!("a snapshot cut at {cut} of {} bytes loaded", bytes.len()),
        }
    }
    let (mut errors, mut harmless) = (0, 0);
    for _ in 0..400 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        std::fs::write(&damaged.0, &b).unwrap();
        match Cache::load(&damaged.0) {
            Err(s) => {
                assert_eq!(s, KVB_ERR_FORMAT, "{}", last_error());
                errors += 1;
            }
            Ok(c) => {
                assert_eq!(
                    bits(&c.attn(0, &q, 0.1)),
                    want,
                    "damage that loads must be harmless"
                );
                harmless += 1;
            }
        }
    }
    assert!(errors > 300, "{errors} errors, {harmless} harmless loads");
}

/// ggml's `quantize_row_q8_0_ref`, written out from ggml-quants.c.
fn ggml_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// ggml's `quantize_row_q4_0_ref`.
fn ggml_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..16 {
            let x0 = ((b[j] * id + 8.5) as i8).min(15) as u8;
            let x1 = ((b[16 + j] * id + 8.5) as i8).min(15) as u8;
            out.push(x0 | (x1 << 4));
        }
    }
    out
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `ggml_vec_dot_q8_0_q8_0` and `ggml_vec_dot_q4_0_q8_0` generic loops.
fn ggml_dot(q4: bool, x: &[u8], y: &[u8]) -> f32 {
    let xb = if q4 { 18 } else { 34 };
    let mut sumf = 0f32;
    for (bx, by) in x.chunks(xb).zip(y.chunks(34)) {
        let (dx, dy) = (f16_at(bx, 0), f16_at(by, 0));
        let yq = |j: usize| by[2 + j] as i8 as i32;
        if q4 {
            let (mut s0, mut s1) = (0i32, 0i32);
            for j in 0..16 {
                s0 += ((bx[2 + j] & 0x0F) as i32 - 8) * yq(j);
                s1 += ((bx[2 + j] >> 4) as i32 - 8) * yq(j + 16);
            }
            sumf += (s0 + s1) as f32 * dx * dy;
        } else {
            let sumi: i32 = (0..32).map(|j| bx[2 + j] as i8 as i32 * yq(j)).sum();
            sumf += sumi as f32 * (dx * dy);
        }
    }
    sumf
}

#[test]
fn row_functions_are_ggml_byte_for_byte() {
    let mut rng = Rng::new(seed("row_functions_are_ggml_byte_for_byte"));
    for k in [32usize, 96, 128, 160, 4096] {
        let x = rows(&mut rng, 1, k);
        let y = rows(&mut rng, 1, k);
        let y8 = ggml_q8_0(&y);
        for (ty, want, q4, quant, dequant, dot) in [
            (
                KVB_TYPE_Q8_0,
                ggml_q8_0(&x),
                false,
                kvb_quantize_row_q8_0 as unsafe extern "C" fn(_, _, _),
                kvb_dequantize_row_q8_0 as unsafe extern "C" fn(_, _, _),
                kvb_vec_dot_q8_0 as unsafe extern "C" fn(_, _, _, _, _, _, _, _),
            ),
            (
                KVB_TYPE_Q4_0,
                ggml_q4_0(&x),
                true,
                kvb_quantize_row_q4_0,
                kvb_dequantize_row_q4_0,
                kvb_vec_dot_q4_0,
            ),
        ] {
            let mut t = kvb_row_traits {
                blck_size: 0,
                type_size: 0,
                vec_dot_type: -1,
            };
            // SAFETY: buffers of the row's sizes.
            unsafe {
                ok(kvb_row_traits_get(ty, &mut t));
                assert_eq!(
                    (t.blck_size, t.type_size, t.vec_dot_type),
                    (32, if q4 { 18 } else { 34 }, 8)
                );
                let mut got = vec![0xAAu8; want.len()];
                quant(x.as_ptr(), got.as_mut_ptr().cast(), k as i64);
                assert_eq!(got, want, "type {ty}, k {k}");
                let mut back = vec![0f32; k];
                dequant(got.as_ptr().cast(), back.as_mut_ptr(), k as i64);
                let d = |i: usize| f16_at(&got, i / 32 * t.type_size);
                let expect_back: Vec<f32> = (0..k)
                    .map(|i| {
                        let b = &got[i / 32 * t.type_size + 2..];
                        let j = i % 32;
                        let code = if q4 {
                            (if j < 16 { b[j] & 0x0F } else { b[j - 16] >> 4 }) as f32 - 8.0
                        } else {
                            b[j] as i8 as f32
                        };
                        code * d(i)
                    })
                    .collect();
                assert_eq!(bits(&back), bits(&expect_back), "type {ty}, k {k}");
                let mut s = 0f32;
                dot(
                    k as i32,
                    &mut s,
                    0,
                    got.as_ptr().cast(),
                    0,
                    y8.as_ptr().cast(),
                    0,
                    1,
                );
                assert_eq!(
                    s.to_bits(),
                    ggml_dot(q4, &got, &y8).to_bits(),
                    "type {ty}, k {k}"
                );
            }
            // The formats themselves, on a token of a head dim they take.
            if k == 128 {
                let f = [FormatId::Q8_0, FormatId::Q4_0][q4 as usize];
                let mut fmt = Vec::new();
                f.imp()
                    .quantize(
                        &x,
                        Shape {
                            n: 1,
                            d: 128,
                            role: Role::Key,
                        },
                        &[],
                        &QuantParams::default(),
                        &mut fmt,
                    )
                    .unwrap();
                assert_eq!(fmt, want, "{f} is not ggml's layout");
            }
        }
    }
}

#[test]
fn q2_had_rows_are_the_format_s_token_records() {
    let mut rng = Rng::new(seed("q2_had_rows_are_the_format_s_token_records"));
    let (n, d) = (3, 128);
    let x = rows(&mut rng, n, d);
    let y = rows(&mut rng, n, d);
    let mut block = Vec::new();
    let shape = Shape {
        n,
        d,
        role: Role::Key,
    };
    FormatId::Q2Had
        .imp()
        .quantize(&x, shape, &[], &QuantParams::default(), &mut block)
        .unwrap();
    assert_eq!(&block[..4], &[0; 4], "no pivots");
    let mut t = kvb_row_traits {
        blck_size: 0,
        type_size: 0,
        vec_dot_type: -1,
    };
    let mut row = vec![0u8; n * 40];
    let mut back = vec![0f32; n * d];
    let mut s = 0f32;
    // SAFETY: buffers of the row's sizes.
    unsafe {
        ok(kvb_row_traits_get(KVB_TYPE_Q2_HAD, &mut t));
        assert_eq!((t.blck_size, t.type_size, t.vec_dot_type), (128, 40, 0));
        ok(kvb_quantize_row(
            KVB_TYPE_Q2_HAD,
            x.as_ptr(),
            row.as_mut_ptr().cast(),
            (n * d) as i64,
        ));
        kvb_dequantize_row_q2_had(row.as_ptr().cast(), back.as_mut_ptr(), (n * d) as i64);
        kvb_vec_dot_q2_had(
            (n * d) as i32,
            &mut s,
            0,
            row.as_ptr().cast(),
            0,
            y.as_ptr().cast(),
            0,
            1,
        );
    }
    assert_eq!(row, block[4..], "a row is the block's token records");
    let mut want = vec![0f32; n * d];
    FormatId::Q2Had.imp().dequantize(&block, shape, &mut want);
    assert_eq!(bits(&back), bits(&want));
    let exact: f64 = back
        .iter()
        .zip(&y)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    let norm: f64 = back
        .iter()
        .zip(&y)
        .map(|(&a, &b)| (a as f64 * b as f64).abs())
        .sum();
    assert!(
        ((s as f64) - exact).abs() <= 1e-4 * norm,
        "dot {s} vs {exact}"
    );
}

#[test]
fn row_function_errors() {
    let x = [1f32; 64];
    let mut y = [0x55u8; 72];
    let mut f = [0f32; 64];
    let mut s = 0f32;
    // SAFETY: buffers at least as large as each call reads or writes.
    unsafe {
        expect(
            kvb_quantize_row(KVB_TYPE_KIVI2, x.as_ptr(), y.as_mut_ptr().cast(), 64),
            KVB_ERR_UNSUPPORTED,
            "q8_0, q4_0 and q2_had",
        );
        expect(
            kvb_quantize_row(KVB_TYPE_Q8_0, x.as_ptr(), y.as_mut_ptr().cast(), 48),
            KVB_ERR_INVALID_ARGUMENT,
            "multiple of 32",
        );
        expect(
            kvb_quantize_row(KVB_TYPE_Q8_0, x.as_ptr(), y.as_mut_ptr().cast(), 0),
            KVB_ERR_INVALID_ARGUMENT,
            "row of 0",
        );
        expect(
            kvb_quantize_row(KVB_TYPE_Q8_0, null(), y.as_mut_ptr().cast(), 32),
            KVB_ERR_INVALID_ARGUMENT,
            "x is NULL",
        );
        let huge = i64::MAX / 32 * 32;
        expect(
            kvb_dequantize_row(KVB_TYPE_Q8_0, y.as_ptr().cast(), f.as_mut_ptr(), huge),
            KVB_ERR_INVALID_ARGUMENT,
            "overflow",
        );
        expect(
            kvb_vec_dot(
                KVB_TYPE_Q8_0,
                32,
                &mut s,
                0,
                y.as_ptr().cast(),
                0,
                y.as_ptr().cast(),
                0,
                2,
            ),
            KVB_ERR_INVALID_ARGUMENT,
            "nrc = 2",
        );
        assert!(s.is_nan(), "a failed dot is NaN");
        // The void forms: NaN values, zero codes, and the message.
        let mut bad = x;
        bad[3] = f32::INFINITY;
        kvb_quantize_row_q8_0(bad.as_ptr(), y.as_mut_ptr().cast(), 64);
        assert!(y[..68].iter().all(|&b| b == 0));
        assert_eq!(y[68], 0x55, "nothing written past the row");
        assert!(last_error().contains("non-finite"), "{}", last_error());
        kvb_dequantize_row_q4_0(y.as_ptr().cast(), f.as_mut_ptr(), 40);
        assert!(f[..40].iter().all(|v| v.is_nan()));
        assert!(last_error().contains("multiple of 32"), "{}", last_error());
    }
}

#[test]
fn last_error_is_per_thread() {
    let fail = |name: &'static str| {
        let mut id = 0;
        // SAFETY: valid pointers.
        let s = unsafe { kvb_type_from_name(c(name).as_ptr(), &mut id) };
        assert_eq!(s, KVB_ERR_INVALID_ARGUMENT);
        last_error()
    };
    let here = fail("first_thread_type");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let b2 = barrier.clone();
    let other = std::thread::spawn(move || {
        assert_eq!(last_error(), "", "a new thread starts with no error");
        let msg = fail("second_thread_type");
        b2.wait();
        b2.wait();
        assert_eq!(
            last_error(),
            msg,
            "another thread's failure changed this thread's message"
        );
        msg
    });
    barrier.wait();
    let _ = fail("third_type");
    barrier.wait();
    let theirs = other.join().unwrap();
    assert!(here.contains("first_thread_type") && theirs.contains("second_thread_type"));
    assert!(last_error().contains("third_type"));
    // A success leaves the message alone.
    let mut id = 0;
    // SAFETY: valid pointers.
    ok(unsafe { kvb_type_from_name(c("q8_0").as_ptr(), &mut id) });
    assert!(last_error().contains("third_type"));
}

/// A CUDA cache through the C ABI against a CPU cache fed the same rows: appends from device
/// pointers (synchronous, and queued on a host stream), decode, dequantize, memory, save and
/// load onto either device; host pointers refused with a message.
#[cfg(feature = "cuda")]
#[test]
fn cuda_cache_through_the_c_abi() {
    use kvbits::cuda::{DeviceBuffer, Stream, device_count};
    if device_count() == 0 {
        eprintln!("no CUDA device: skipping GPU test");
        return;
    }
    let mut rng = Rng::new(seed("cuda_cache_through_the_c_abi"));
    let stream = Stream::new().unwrap();
    let (nl, nh, hk, d) = (2, 14, 2, 128);
    let row = (hk * d) as usize;
    for preset in PRESETS {
        let cpu_p = params(Some(preset), nl, nh, hk, d);
        let mut gpu_p = cpu_p;
        gpu_p.device = KVB_DEVICE_CUDA;
        let (cpu, gpu) = (Cache::new(&cpu_p), Cache::new(&gpu_p));
        let mut got = std::mem::MaybeUninit::uninit();
        // SAFETY: valid pointers.
        ok(unsafe { kvb_cache_get_params(gpu.0, got.as_mut_ptr()) });
        // SAFETY: written by the call above.
        assert_eq!(unsafe { got.assume_init() }.device, KVB_DEVICE_CUDA);
        for (i, &(n, m, salient, _)) in SCRIPT.iter().enumerate() {
            for layer in 0..nl {
                let (k, v) = (rows(&mut rng, n, row), rows(&mut rng, n, row));
                let sal: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
                let sal = salient.then_some(&sal[..]);
                ok(cpu.append(layer, &k, &v, n as i32, m, sal));
                let (dk, dv) = (
                    DeviceBuffer::from_slice(&k, &stream).unwrap(),
                    DeviceBuffer::from_slice(&v, &stream).unwrap(),
                );
                let sp = sal.map_or(null(), |s| s.as_ptr());
                let (kp, vp) = (dk.as_ptr().cast::<f32>(), dv.as_ptr().cast::<f32>());
                // SAFETY: device rows of n tokens; the stream outlives the call.
                ok(unsafe {
                    if i % 2 == 0 {
                        kvb_cache_append(gpu.0, layer, kp, vp, n as i32, m, sp)
                    } else {
                        kvb_cache_append_async(gpu.0, layer, kp, vp, n as i32, m, sp, stream.raw())
                    }
                });
                stream.synchronize().unwrap();
            }
        }
        for layer in 0..nl {
            assert_eq!(gpu.n_tokens(layer), cpu.n_tokens(layer));
            let q = rows(&mut rng, 1, (nh * d) as usize);
            let want = cpu.attn(layer, &q, 0.088);
            let dq = DeviceBuffer::from_slice(&q, &stream).unwrap();
            let dout = DeviceBuffer::new(q.len() * 4).unwrap();
            // SAFETY: device buffers of n_head * head_dim floats.
            ok(unsafe {
                kvb_cache_attn_decode_async(
                    gpu.0,
                    layer,
                    dq.as_ptr().cast(),
                    dout.as_ptr().cast(),
                    0.088,
                    stream.raw(),
                )
            });
            let mut out = vec![0f32; q.len()];
            dout.download(&mut out, 0, &stream).unwrap();
            let err = kvbits::rng::rel_err(&out, &want);
            assert!(
                err < 1e-3,
                "{preset}: layer {layer} decode rel. error {err:.2e}"
            );

            // Host pointers are refused by name.
            let mut host_out = vec![0f32; q.len()];
            // SAFETY: valid host pointers, refused before use.
            expect(
                unsafe {
                    kvb_cache_attn_decode(gpu.0, layer, q.as_ptr(), host_out.as_mut_ptr(), 0.1)
                },
                KVB_ERR_INVALID_ARGUMENT,
                "q is host memory",
            );

            let (first, n) = (rng.below(500), 1 + rng.below(100));
            let len = n * row;
            let (dk, dv) = (
                DeviceBuffer::new(2 * len).unwrap(),
                DeviceBuffer::new(2 * len).unwrap(),
            );
            // SAFETY: device buffers of len f16 each.
            ok(unsafe {
                kvb_cache_dequantize(
                    gpu.0,
                    layer,
                    first as i64,
                    n as i64,
                    dk.as_ptr().cast(),
                    dv.as_ptr().cast(),
                )
            });
            let (mut gk, mut gv) = (vec![0u16; len], vec![0u16; len]);
            dk.download(&mut gk, 0, &stream).unwrap();
            dv.download(&mut gv, 0, &stream).unwrap();
            let (mut ck, mut cv) = (vec![0u16; len], vec![0u16; len]);
            // SAFETY: host buffers of len u16 each.
            ok(unsafe {
                kvb_cache_dequantize(
                    cpu.0,
                    layer,
                    first as i64,
                    n as i64,
                    ck.as_mut_ptr(),
                    cv.as_mut_ptr(),
                )
            });
            assert!(gv == cv, "{preset}: V tokens {first}+{n}");
            // VidKV's FFT keys may round a tie differently on the device.
            if preset != "vidkv" {
                assert!(gk == ck, "{preset}: K tokens {first}+{n}");
            }
        }
        assert_eq!(gpu.memory(), cpu.memory(), "{preset}");

        // Saved from the device, loaded on either: the host copy attends as the CPU does, the
        // device copy exactly as the saved cache.
        let path = TempPath::new(&format!("cuda-{preset}"));
        gpu.save(&path.0);
        let on_cpu = Cache::load(&path.0).unwrap();
        let mut raw = null_mut();
        let cpath = c(path.0.to_str().unwrap());
        // SAFETY: valid pointers.
        ok(unsafe { kvb_cache_load_on(cpath.as_ptr(), KVB_DEVICE_CUDA, 0, &mut raw) });
        let on_gpu = Cache(raw);
        let q = rows(&mut rng, 1, (nh * d) as usize);
        let dq = DeviceBuffer::from_slice(&q, &stream).unwrap();
        let mut outs = Vec::new();
        for c in [&gpu, &on_gpu] {
            let dout = DeviceBuffer::new(q.len() * 4).unwrap();
            // SAFETY: device buffers of n_head * head_dim floats.
            ok(unsafe {
                kvb_cache_attn_decode(c.0, 0, dq.as_ptr().cast(), dout.as_ptr().cast(), 0.088)
            });
            let mut out = vec![0f32; q.len()];
            dout.download(&mut out, 0, &stream).unwrap();
            outs.push(out);
        }
        assert_eq!(
            bits(&outs[0]),
            bits(&outs[1]),
            "{preset}: device attention after load"
        );
        let err = kvbits::rng::rel_err(&outs[0], &on_cpu.attn(0, &q, 0.088));
        assert!(
            err < 1e-3,
            "{preset}: host copy of the device cache, rel. error {err:.2e}"
        );
    }
}
