//! The cache through C: create, append, attend, dequantize, measure, save and load.

use std::ffi::{c_char, c_int, c_void};

use half::f16;

use super::params::{KVB_DEVICE_CPU, KVB_DEVICE_CUDA, from_config, kvb_cache_params, to_config};
use super::params::{KVB_MODALITY_TEXT, KVB_MODALITY_VISUAL};
use super::status::{
    Fail, KVB_ERR_FORMAT, KVB_ERR_INTERNAL, KVB_ERR_NO_CUDA, KVB_ERR_UNSUPPORTED, arg, arg_mut,
    c_str, guard, guard_value, mul, non_negative, positive, slice, slice_mut,
};
use crate::gguf::{GgufFile, MetaValue};
use crate::kv::{KvCache, Modality, Rows};

/// Snapshot metadata key of the query-head count, which the C cache adds to KvCache's own.
const N_HEAD_KEY: &str = "kvbits.cache.n_head";

/// One sequence's KV cache.
pub struct kvb_cache {
    cache: KvCache,
    n_head: usize,
    /// Set while a call modifies the cache: still set afterwards only if that call panicked,
    /// and then the cache may be half-updated, so every later call refuses it.
    busy: bool,
}

/// Bytes held, by category, and the effective bits per stored value.
#[repr(C)]
pub struct kvb_memory {
    pub bytes_codes: u64,
    pub bytes_meta: u64,
    /// The f16 residual: tokens not yet quantized.
    pub bytes_residual: u64,
    pub bytes_total: u64,
    pub bits_k: f64,
    pub bits_v: f64,
}

const NOT_YET: &str = "the CUDA device-resident cache is not available yet in this kvbits: \
                       create the cache with device = KVB_DEVICE_CPU";

/// The failure of a CUDA path: no CUDA in this build, or (with CUDA) not implemented yet.
fn cuda_path() -> Fail {
    if cfg!(feature = "cuda") {
        Fail::new(KVB_ERR_UNSUPPORTED, NOT_YET)
    } else {
        Fail::new(
            KVB_ERR_NO_CUDA,
            "this kvbits library was built without CUDA: rebuild it with `--features cuda`, \
             or use device = KVB_DEVICE_CPU",
        )
    }
}

impl kvb_cache {
    fn check(&self) -> Result<(), Fail> {
        if self.busy {
            return Err(Fail::new(
                KVB_ERR_INTERNAL,
                "this cache is unusable after an internal error in an earlier call: free it",
            ));
        }
        Ok(())
    }

    fn row(&self) -> usize {
        self.cache.config().n_head_kv * self.cache.config().head_dim
    }

    /// Runs `f` on the cache, refusing it for good should `f` panic.
    fn modify<T>(&mut self, f: impl FnOnce(&mut KvCache) -> Result<T, Fail>) -> Result<T, Fail> {
        self.check()?;
        self.busy = true;
        let out = f(&mut self.cache);
        self.busy = false;
        out
    }
}

/// # Safety
/// `c` must be NULL or a live cache from this library, not used by another thread meanwhile.
unsafe fn cache_ref<'a>(c: *const kvb_cache) -> Result<&'a kvb_cache, Fail> {
    // SAFETY: the caller's contract.
    let c = unsafe { arg(c, "cache") }?;
    c.check()?;
    Ok(c)
}

/// # Safety
/// As [`cache_ref`], and no other reference to the cache is in use.
unsafe fn cache_mut<'a>(c: *mut kvb_cache) -> Result<&'a mut kvb_cache, Fail> {
    // SAFETY: the caller's contract.
    unsafe { arg_mut(c, "cache") }
}

fn layer_index(c: &kvb_cache, layer: i32) -> Result<usize, Fail> {
    let n = c.cache.n_layer();
    usize::try_from(layer)
        .ok()
        .filter(|&l| l < n)
        .ok_or_else(|| {
            Fail::invalid(format!(
                "layer {layer} out of range: the cache has {n} layers (0..{n})"
            ))
        })
}

fn modality(m: i32) -> Result<Modality, Fail> {
    match m {
        KVB_MODALITY_TEXT => Ok(Modality::Text),
        KVB_MODALITY_VISUAL => Ok(Modality::Visual),
        _ => Err(Fail::invalid(format!(
            "modality {m}: use KVB_MODALITY_TEXT (0) or KVB_MODALITY_VISUAL (1)"
        ))),
    }
}

/// Creates a cache. With `device = KVB_DEVICE_CUDA` it fails: `KVB_ERR_NO_CUDA` in a build
/// without CUDA, `KVB_ERR_UNSUPPORTED` in one with it (the device-resident cache is not
/// available yet).
///
/// # Safety
/// `p` must be NULL or valid; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_new(
    p: *const kvb_cache_params,
    out: *mut *mut kvb_cache,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { arg_mut(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: the caller's contract.
        let p = unsafe { arg(p, "params") }?;
        match p.device {
            KVB_DEVICE_CPU => {}
            KVB_DEVICE_CUDA if p.device_id < 0 => {
                return Err(Fail::invalid(format!(
                    "device_id = {}: it must be >= 0",
                    p.device_id
                )));
            }
            KVB_DEVICE_CUDA => return Err(cuda_path()),
            d => {
                return Err(Fail::invalid(format!(
                    "device = {d}: use KVB_DEVICE_CPU (0) or KVB_DEVICE_CUDA (1)"
                )));
            }
        }
        let (cfg, n_head) = to_config(p)?;
        let cache = KvCache::new(cfg)?;
        *out = Box::into_raw(Box::new(kvb_cache {
            cache,
            n_head,
            busy: false,
        }));
        Ok(())
    })
}

/// Frees a cache; NULL is a no-op.
///
/// # Safety
/// `c` must be NULL or a cache from this library not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_free(c: *mut kvb_cache) {
    guard(|| {
        if !c.is_null() {
            // SAFETY: made by Box::into_raw here, freed once by the contract.
            drop(unsafe { Box::from_raw(c) });
        }
        Ok(())
    });
}

/// The parameters the cache was made with (a loaded cache's too); `calibrate` resolved to 0/1.
///
/// # Safety
/// `c` must be NULL or a live cache; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_get_params(
    c: *const kvb_cache,
    out: *mut kvb_cache_params,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let (c, out) = unsafe { (cache_ref(c)?, arg_mut(out, "out")?) };
        *out = from_config(c.cache.config(), c.n_head);
        Ok(())
    })
}

/// # Safety
/// Pointers as `kvb_cache_append` documents.
unsafe fn append(
    c: *mut kvb_cache,
    layer: i32,
    k: Rows<'_>,
    v: Rows<'_>,
    n_tokens: usize,
    modality: Modality,
    saliency: *const f32,
) -> Result<(), Fail> {
    // SAFETY: the caller's contract.
    let c = unsafe { cache_mut(c) }?;
    let layer = layer_index(c, layer)?;
    let saliency = if saliency.is_null() {
        None
    } else {
        // SAFETY: n_tokens values by the caller's contract.
        Some(unsafe { slice(saliency, n_tokens, "saliency") }?)
    };
    c.modify(|cache| Ok(cache.append(layer, k, v, n_tokens, modality, saliency)?))
}

/// The number of values of `n_tokens` rows, and the token count as usize.
///
/// # Safety
/// `c` must be NULL or a live cache.
unsafe fn rows_len(
    c: *const kvb_cache,
    n_tokens: i32,
    modality_id: i32,
) -> Result<(usize, usize, Modality), Fail> {
    // SAFETY: the caller's contract.
    let c = unsafe { cache_ref(c) }?;
    let n = positive(n_tokens.into(), "n_tokens")?;
    let m = modality(modality_id)?;
    Ok((n, mul(n, c.row(), "n_tokens x n_head_kv x head_dim")?, m))
}

/// Appends `n_tokens` tokens of one modality to `layer`: `k` and `v` are f32 rows
/// `[n_tokens][n_head_kv][head_dim]`; `saliency` (one per token, may be NULL) ranks a visual
/// span's tokens for protection. On error the cache is left as it was.
///
/// # Safety
/// `c` must be NULL or a live cache; `k` and `v` NULL or `n_tokens * n_head_kv * head_dim`
/// readable floats; `saliency` NULL or `n_tokens` readable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_append(
    c: *mut kvb_cache,
    layer: i32,
    k: *const f32,
    v: *const f32,
    n_tokens: i32,
    modality: i32,
    saliency: *const f32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract, for all three calls.
        unsafe {
            let (n, len, m) = rows_len(c, n_tokens, modality)?;
            let (k, v) = (slice(k, len, "k")?, slice(v, len, "v")?);
            append(c, layer, Rows::F32(k), Rows::F32(v), n, m, saliency)
        }
    })
}

/// `kvb_cache_append` with K and V as IEEE half floats (their bits in `uint16_t`).
///
/// # Safety
/// As `kvb_cache_append`, with `k` and `v` readable `uint16_t`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_append_f16(
    c: *mut kvb_cache,
    layer: i32,
    k: *const u16,
    v: *const u16,
    n_tokens: i32,
    modality: i32,
    saliency: *const f32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract; `f16` is a transparent `u16`.
        unsafe {
            let (n, len, m) = rows_len(c, n_tokens, modality)?;
            let k = slice(k.cast::<f16>(), len, "k")?;
            let v = slice(v.cast::<f16>(), len, "v")?;
            append(c, layer, Rows::F16(k), Rows::F16(v), n, m, saliency)
        }
    })
}

/// Decode attention of one new token over everything cached in `layer`: `q` and `out` are
/// `[n_head][head_dim]` floats; logits are `scale * q.k` (usually `1/sqrt(head_dim)`).
///
/// # Safety
/// `c` must be NULL or a live cache; `q` NULL or `n_head * head_dim` readable floats; `out`
/// NULL or as many writable floats, not overlapping `q`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_attn_decode(
    c: *mut kvb_cache,
    layer: i32,
    q: *const f32,
    out: *mut f32,
    scale: f32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let c = unsafe { cache_ref(c) }?;
        let layer = layer_index(c, layer)?;
        let len = c.n_head * c.cache.config().head_dim;
        // SAFETY: the caller's contract.
        let (q, out) = unsafe { (slice(q, len, "q")?, slice_mut(out, len, "out")?) };
        Ok(c.cache.attention_decode(layer, q, c.n_head, out, scale)?)
    })
}

/// Tokens `first..first + n` of `layer` as f16 rows `[n][n_head_kv][head_dim]` (bits in
/// `uint16_t`), for a host's own attention.
///
/// # Safety
/// `c` must be NULL or a live cache; `k_f16` and `v_f16` NULL or `n * n_head_kv * head_dim`
/// writable `uint16_t`s each, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_dequantize(
    c: *mut kvb_cache,
    layer: i32,
    first: i64,
    n: i64,
    k_f16: *mut u16,
    v_f16: *mut u16,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let c = unsafe { cache_ref(c) }?;
        let layer = layer_index(c, layer)?;
        let first = non_negative(first, "first")?;
        let n = positive(n, "n")?;
        let have = c.cache.n_tokens(layer);
        if first.checked_add(n).is_none_or(|end| end > have) {
            return Err(Fail::invalid(format!(
                "tokens {first}..{first}+{n} out of range: layer {layer} has {have} tokens"
            )));
        }
        let len = mul(n, c.row(), "n x n_head_kv x head_dim")?;
        // SAFETY: the caller's contract; `f16` is a transparent `u16`.
        let (k, v) = unsafe {
            (
                slice_mut(k_f16.cast::<f16>(), len, "k_f16")?,
                slice_mut(v_f16.cast::<f16>(), len, "v_f16")?,
            )
        };
        Ok(c.cache.dequantize(layer, first, n, k, v)?)
    })
}

/// Tokens cached in `layer`, or -1 (with `kvb_last_error` set) for a NULL cache or a layer
/// out of range.
///
/// # Safety
/// `c` must be NULL or a live cache.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_n_tokens(c: *const kvb_cache, layer: i32) -> i64 {
    guard_value(-1, || {
        // SAFETY: the caller's contract.
        let c = unsafe { cache_ref(c) }?;
        let layer = layer_index(c, layer)?;
        Ok(c.cache.n_tokens(layer) as i64)
    })
}

/// Exact bytes held, by category (codes, scales and masks, f16 residual).
///
/// # Safety
/// `c` must be NULL or a live cache; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_memory(c: *const kvb_cache, out: *mut kvb_memory) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let (c, out) = unsafe { (cache_ref(c)?, arg_mut(out, "out")?) };
        let m = c.cache.memory();
        *out = kvb_memory {
            bytes_codes: m.codes,
            bytes_meta: m.meta,
            bytes_residual: m.residual,
            bytes_total: m.total,
            bits_k: m.bits_k,
            bits_v: m.bits_v,
        };
        Ok(())
    })
}

/// Saves the cache to `path` as a GGUF file: parameters as metadata, blocks and residual as
/// tensors, with a checksum. Written beside `path` first, then renamed over it.
///
/// # Safety
/// `c` must be NULL or a live cache; `path` NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_save(c: *const kvb_cache, path: *const c_char) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let (c, path) = unsafe { (cache_ref(c)?, c_str(path, "path")?) };
        let n_head = u32::try_from(c.n_head).map_err(|_| Fail::invalid("n_head too large"))?;
        let extra = vec![(N_HEAD_KEY.to_owned(), MetaValue::U32(n_head))];
        Ok(c.cache.save_with(path, extra)?)
    })
}

/// Loads a cache saved by `kvb_cache_save`; a damaged or truncated file is `KVB_ERR_FORMAT`.
/// Attention of the loaded cache equals the saved one's, bit for bit.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_load(path: *const c_char, out: *mut *mut kvb_cache) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { arg_mut(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: the caller's contract.
        let path = unsafe { c_str(path, "path") }?;
        let file = GgufFile::open(path)?;
        let gguf = file.parse()?;
        let cache = KvCache::from_snapshot(&gguf).map_err(|e| {
            let mut f = Fail::from(e);
            f.message = format!("{path}: {}", f.message);
            f
        })?;
        let n_head = gguf
            .get(N_HEAD_KEY)
            .and_then(|v| v.as_int())
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0 && n % cache.config().n_head_kv == 0)
            .ok_or_else(|| {
                Fail::new(
                    KVB_ERR_FORMAT,
                    format!(
                        "{path}: no valid '{N_HEAD_KEY}' (a multiple of the KV heads): \
                         save the cache with kvb_cache_save"
                    ),
                )
            })?;
        *out = Box::into_raw(Box::new(kvb_cache {
            cache,
            n_head,
            busy: false,
        }));
        Ok(())
    })
}

/// 1 if this library was built with CUDA (the `cuda` feature), else 0.
#[unsafe(no_mangle)]
pub extern "C" fn kvb_has_cuda() -> c_int {
    cfg!(feature = "cuda") as c_int
}

/// `kvb_cache_append` on a CUDA cache, ordered on `stream` (a `cudaStream_t`).
/// Not available yet: `KVB_ERR_NO_CUDA` without CUDA, else `KVB_ERR_UNSUPPORTED`.
#[allow(clippy::too_many_arguments)] // the synchronous call's arguments and a stream
#[unsafe(no_mangle)]
pub extern "C" fn kvb_cache_append_async(
    c: *mut kvb_cache,
    layer: i32,
    k: *const f32,
    v: *const f32,
    n_tokens: i32,
    modality: i32,
    saliency: *const f32,
    stream: *mut c_void,
) -> c_int {
    let _ = (c, layer, k, v, n_tokens, modality, saliency, stream);
    guard(|| Err(cuda_path()))
}

/// `kvb_cache_append_f16` on a CUDA cache, ordered on `stream`. Not available yet.
#[allow(clippy::too_many_arguments)] // the synchronous call's arguments and a stream
#[unsafe(no_mangle)]
pub extern "C" fn kvb_cache_append_f16_async(
    c: *mut kvb_cache,
    layer: i32,
    k: *const u16,
    v: *const u16,
    n_tokens: i32,
    modality: i32,
    saliency: *const f32,
    stream: *mut c_void,
) -> c_int {
    let _ = (c, layer, k, v, n_tokens, modality, saliency, stream);
    guard(|| Err(cuda_path()))
}

/// `kvb_cache_attn_decode` on a CUDA cache, ordered on `stream`. Not available yet.
#[unsafe(no_mangle)]
pub extern "C" fn kvb_cache_attn_decode_async(
    c: *mut kvb_cache,
    layer: i32,
    q: *const f32,
    out: *mut f32,
    scale: f32,
    stream: *mut c_void,
) -> c_int {
    let _ = (c, layer, q, out, scale, stream);
    guard(|| Err(cuda_path()))
}

/// `kvb_cache_dequantize` on a CUDA cache, ordered on `stream`. Not available yet.
#[unsafe(no_mangle)]
pub extern "C" fn kvb_cache_dequantize_async(
    c: *mut kvb_cache,
    layer: i32,
    first: i64,
    n: i64,
    k_f16: *mut u16,
    v_f16: *mut u16,
    stream: *mut c_void,
) -> c_int {
    let _ = (c, layer, first, n, k_f16, v_f16, stream);
    guard(|| Err(cuda_path()))
}
