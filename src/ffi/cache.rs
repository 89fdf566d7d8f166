//! The cache through C: create, append, attend, dequantize, measure, save and load.

use std::ffi::{c_char, c_int, c_void};

use half::f16;

use super::params::{KVB_DEVICE_CPU, KVB_DEVICE_CUDA, from_config, kvb_cache_params, to_config};
use super::params::{KVB_MODALITY_TEXT, KVB_MODALITY_VISUAL};
use super::status::{
    Fail, KVB_ERR_FORMAT, KVB_ERR_INTERNAL, KVB_ERR_NO_CUDA, arg, arg_mut, c_str, guard,
    guard_value, mul, non_negative, positive, slice, slice_mut,
};
#[cfg(feature = "cuda")]
use crate::cuda::{DeviceCache, Stream};
use crate::gguf::{GgufFile, MetaValue};
use crate::kv::{CacheConfig, KvCache, MemoryReport, Modality, Rows};

/// Snapshot metadata key of the query-head count, which the C cache adds to KvCache's own.
const N_HEAD_KEY: &str = "kvbits.cache.n_head";

/// One sequence's KV cache.
pub struct kvb_cache {
    store: Store,
    n_head: usize,
    /// Set while a call modifies the cache: still set afterwards only if that call panicked,
    /// and then the cache may be half-updated, so every later call refuses it.
    busy: bool,
}

/// Where the cache keeps its bytes.
enum Store {
    Cpu(KvCache),
    #[cfg(feature = "cuda")]
    Cuda(DeviceCache),
}

impl Store {
    fn config(&self) -> &CacheConfig {
        match self {
            Store::Cpu(c) => c.config(),
            #[cfg(feature = "cuda")]
            Store::Cuda(c) => c.config(),
        }
    }

    fn n_tokens(&self, layer: usize) -> usize {
        match self {
            Store::Cpu(c) => c.n_tokens(layer),
            #[cfg(feature = "cuda")]
            Store::Cuda(c) => c.n_tokens(layer),
        }
    }

    fn memory(&self) -> MemoryReport {
        match self {
            Store::Cpu(c) => c.memory(),
            #[cfg(feature = "cuda")]
            Store::Cuda(c) => c.memory(),
        }
    }
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

/// The failure of a CUDA path in a build without CUDA.
fn no_cuda_fail() -> Fail {
    Fail::new(
        KVB_ERR_NO_CUDA,
        "this kvbits library was built without CUDA: rebuild it with `--features cuda`, \
         or use device = KVB_DEVICE_CPU",
    )
}

/// The host's stream (NULL: the legacy default stream).
#[cfg(feature = "cuda")]
fn host_stream(stream: *mut c_void) -> Stream {
    // SAFETY: a cudaStream_t the host owns and keeps alive during the call, or NULL.
    unsafe { Stream::borrowed(stream) }
}

/// `p` as a device pointer on the cache's GPU, or why it is not one.
#[cfg(feature = "cuda")]
fn device_ptr<T>(p: *const T, name: &str, cache: &DeviceCache) -> Result<*const T, Fail> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{name} is NULL")));
    }
    match crate::cuda::pointer_device(p.cast())? {
        Some(d) if d == cache.device() => Ok(p),
        Some(d) => Err(Fail::invalid(format!(
            "{name} lies on CUDA device {d}, the cache on device {}",
            cache.device()
        ))),
        None => Err(Fail::invalid(format!(
            "{name} is host memory: a KVB_DEVICE_CUDA cache takes device pointers (from \
             cudaMalloc); pass host memory to a KVB_DEVICE_CPU cache"
        ))),
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

    /// Refuses an `_async` call (one with a stream) on a CPU cache.
    fn check_stream(&self, stream: Option<*mut c_void>) -> Result<(), Fail> {
        match self.store {
            Store::Cpu(_) if stream.is_some() => Err(on_cpu_cache()),
            _ => Ok(()),
        }
    }

    fn row(&self) -> usize {
        self.store.config().n_head_kv * self.store.config().head_dim
    }

    /// Runs `f` on the cache, refusing it for good should `f` panic.
    fn modify<T>(&mut self, f: impl FnOnce(&mut Store) -> Result<T, Fail>) -> Result<T, Fail> {
        self.check()?;
        self.busy = true;
        let out = f(&mut self.store);
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
    let n = c.store.config().n_layer;
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

/// Creates a cache: in host memory (`device = KVB_DEVICE_CPU`), or in the memory of GPU
/// `device_id` (`KVB_DEVICE_CUDA`; `KVB_ERR_NO_CUDA` in a build without CUDA). A CUDA cache's
/// calls take device pointers for rows, queries and outputs (saliency stays in host memory).
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
        let (cfg, n_head) = to_config(p)?;
        let store = make_store(cfg, p.device, p.device_id)?;
        *out = Box::into_raw(Box::new(kvb_cache {
            store,
            n_head,
            busy: false,
        }));
        Ok(())
    })
}

/// A cache of `cfg` on `device` (`KVB_DEVICE_*`), or a CPU cache's copy moved there.
fn make_store(cfg: CacheConfig, device: i32, device_id: i32) -> Result<Store, Fail> {
    match device {
        KVB_DEVICE_CPU => Ok(Store::Cpu(KvCache::new(cfg)?)),
        KVB_DEVICE_CUDA if device_id < 0 => Err(Fail::invalid(format!(
            "device_id = {device_id}: it must be >= 0"
        ))),
        #[cfg(feature = "cuda")]
        KVB_DEVICE_CUDA => Ok(Store::Cuda(DeviceCache::new(cfg, device_id as usize)?)),
        #[cfg(not(feature = "cuda"))]
        KVB_DEVICE_CUDA => Err(no_cuda_fail()),
        d => Err(Fail::invalid(format!(
            "device = {d}: use KVB_DEVICE_CPU (0) or KVB_DEVICE_CUDA (1)"
        ))),
    }
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
        *out = from_config(c.store.config(), c.n_head);
        #[cfg(feature = "cuda")]
        if let Store::Cuda(d) = &c.store {
            out.device = KVB_DEVICE_CUDA;
            out.device_id = d.device() as i32;
        }
        Ok(())
    })
}

/// An append of rows `k` and `v` (f32, or f16 with `f16`): host memory for a CPU cache,
/// device memory for a CUDA one, ordered on `stream` when given (else the call waits).
///
/// # Safety
/// Pointers as `kvb_cache_append` documents.
#[allow(clippy::too_many_arguments)]
unsafe fn append(
    c: *mut kvb_cache,
    layer: i32,
    k: *const c_void,
    v: *const c_void,
    f16: bool,
    n_tokens: i32,
    modality_id: i32,
    saliency: *const f32,
    stream: Option<*mut c_void>,
) -> Result<(), Fail> {
    // SAFETY: the caller's contract.
    let c = unsafe { cache_mut(c) }?;
    c.check_stream(stream)?;
    let layer = layer_index(c, layer)?;
    let n = positive(n_tokens.into(), "n_tokens")?;
    let m = modality(modality_id)?;
    let len = mul(n, c.row(), "n_tokens x n_head_kv x head_dim")?;
    let saliency = if saliency.is_null() {
        None
    } else {
        // SAFETY: n_tokens values by the caller's contract.
        Some(unsafe { slice(saliency, n, "saliency") }?)
    };
    c.modify(|store| match store {
        Store::Cpu(cache) => {
            // SAFETY: the caller's contract; `f16` is a transparent `u16`.
            let (k, v) = unsafe {
                if f16 {
                    (
                        Rows::F16(slice(k.cast::<f16>(), len, "k")?),
                        Rows::F16(slice(v.cast::<f16>(), len, "v")?),
                    )
                } else {
                    (
                        Rows::F32(slice(k.cast::<f32>(), len, "k")?),
                        Rows::F32(slice(v.cast::<f32>(), len, "v")?),
                    )
                }
            };
            Ok(cache.append(layer, k, v, n, m, saliency)?)
        }
        #[cfg(feature = "cuda")]
        Store::Cuda(dev) => {
            let (k, v) = (device_ptr(k, "k", dev)?, device_ptr(v, "v", dev)?);
            let s = host_stream(stream.unwrap_or(std::ptr::null_mut()));
            // SAFETY: device pointers on the cache's GPU, holding the rows by the contract.
            unsafe { dev.append_raw(layer, k, v, f16, n, m, saliency, stream.is_none(), &s) }?;
            if stream.is_none() {
                s.synchronize()?;
            }
            Ok(())
        }
    })
}

/// The failure of an `_async` call on a CPU cache.
fn on_cpu_cache() -> Fail {
    if cfg!(feature = "cuda") {
        Fail::invalid(
            "the _async calls take a KVB_DEVICE_CUDA cache: call the synchronous one on a \
             CPU cache",
        )
    } else {
        no_cuda_fail()
    }
}

/// Appends `n_tokens` tokens of one modality to `layer`: `k` and `v` are f32 rows
/// `[n_tokens][n_head_kv][head_dim]`; `saliency` (one per token, may be NULL) ranks a visual
/// span's tokens for protection. On error the cache is left as it was. On a CUDA cache `k`
/// and `v` are device pointers (`saliency` stays in host memory) and the call returns when
/// the rows are stored; a NaN, an infinity or a value beyond ±65504 is refused.
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
    // SAFETY: the caller's contract.
    guard(|| unsafe {
        append(
            c,
            layer,
            k.cast(),
            v.cast(),
            false,
            n_tokens,
            modality,
            saliency,
            None,
        )
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
    // SAFETY: the caller's contract.
    guard(|| unsafe {
        append(
            c,
            layer,
            k.cast(),
            v.cast(),
            true,
            n_tokens,
            modality,
            saliency,
            None,
        )
    })
}

/// # Safety
/// Pointers as `kvb_cache_attn_decode` documents.
unsafe fn attn_decode(
    c: *mut kvb_cache,
    layer: i32,
    q: *const f32,
    out: *mut f32,
    scale: f32,
    stream: Option<*mut c_void>,
) -> Result<(), Fail> {
    // SAFETY: the caller's contract.
    let c = unsafe { cache_mut(c) }?;
    c.check_stream(stream)?;
    let layer = layer_index(c, layer)?;
    let n_head = c.n_head;
    let len = n_head * c.store.config().head_dim;
    c.modify(|store| match store {
        Store::Cpu(cache) => {
            // SAFETY: the caller's contract.
            let (q, out) = unsafe { (slice(q, len, "q")?, slice_mut(out, len, "out")?) };
            Ok(cache.attention_decode(layer, q, n_head, out, scale)?)
        }
        #[cfg(feature = "cuda")]
        Store::Cuda(dev) => {
            let q = device_ptr(q, "q", dev)?;
            let out = device_ptr(out.cast_const(), "out", dev)?.cast_mut();
            let s = host_stream(stream.unwrap_or(std::ptr::null_mut()));
            // SAFETY: device pointers on the cache's GPU, of the sizes the contract gives.
            unsafe { dev.attention_decode_raw(layer, q, out, n_head, scale, &s) }?;
            if stream.is_none() {
                s.synchronize()?;
            }
            Ok(())
        }
    })
}

/// Decode attention of one new token over everything cached in `layer`: `q` and `out` are
/// `[n_head][head_dim]` floats (device pointers on a CUDA cache); logits are `scale * q.k`
/// (usually `1/sqrt(head_dim)`).
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
    // SAFETY: the caller's contract.
    guard(|| unsafe { attn_decode(c, layer, q, out, scale, None) })
}

/// # Safety
/// Pointers as `kvb_cache_dequantize` documents.
unsafe fn dequantize(
    c: *mut kvb_cache,
    layer: i32,
    first: i64,
    n: i64,
    k_f16: *mut u16,
    v_f16: *mut u16,
    stream: Option<*mut c_void>,
) -> Result<(), Fail> {
    // SAFETY: the caller's contract.
    let c = unsafe { cache_mut(c) }?;
    c.check_stream(stream)?;
    let layer = layer_index(c, layer)?;
    let first = non_negative(first, "first")?;
    let n = positive(n, "n")?;
    let have = c.store.n_tokens(layer);
    if first.checked_add(n).is_none_or(|end| end > have) {
        return Err(Fail::invalid(format!(
            "tokens {first}..{first}+{n} out of range: layer {layer} has {have} tokens"
        )));
    }
    let len = mul(n, c.row(), "n x n_head_kv x head_dim")?;
    c.modify(|store| match store {
        Store::Cpu(cache) => {
            // SAFETY: the caller's contract; `f16` is a transparent `u16`.
            let (k, v) = unsafe {
                (
                    slice_mut(k_f16.cast::<f16>(), len, "k_f16")?,
                    slice_mut(v_f16.cast::<f16>(), len, "v_f16")?,
                )
            };
            Ok(cache.dequantize(layer, first, n, k, v)?)
        }
        #[cfg(feature = "cuda")]
        Store::Cuda(dev) => {
            let k = device_ptr(k_f16.cast_const(), "k_f16", dev)?.cast_mut();
            let v = device_ptr(v_f16.cast_const(), "v_f16", dev)?.cast_mut();
            let s = host_stream(stream.unwrap_or(std::ptr::null_mut()));
            // SAFETY: device pointers on the cache's GPU, of the sizes the contract gives.
            Ok(unsafe { dev.dequantize_raw(layer, first, n, k.cast(), v.cast(), &s) }?)
        }
    })
}

/// Tokens `first..first + n` of `layer` as f16 rows `[n][n_head_kv][head_dim]` (bits in
/// `uint16_t`; device pointers on a CUDA cache), for a host's own attention.
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
    // SAFETY: the caller's contract.
    guard(|| unsafe { dequantize(c, layer, first, n, k_f16, v_f16, None) })
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
        Ok(c.store.n_tokens(layer) as i64)
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
        let m = c.store.memory();
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
        match &c.store {
            Store::Cpu(cache) => Ok(cache.save_with(path, extra)?),
            #[cfg(feature = "cuda")]
            Store::Cuda(dev) => Ok(dev
                .to_host(&host_stream(std::ptr::null_mut()))?
                .save_with(path, extra)?),
        }
    })
}

/// Loads a cache saved by `kvb_cache_save` into host memory; a damaged or truncated file is
/// `KVB_ERR_FORMAT`. Attention of the loaded cache equals the saved one's, bit for bit.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_load(path: *const c_char, out: *mut *mut kvb_cache) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { kvb_cache_load_on(path, KVB_DEVICE_CPU, 0, out) }
}

/// `kvb_cache_load` onto `device` (`KVB_DEVICE_CPU`, or `KVB_DEVICE_CUDA` and GPU
/// `device_id`), whatever device the cache was saved from.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_load_on(
    path: *const c_char,
    device: i32,
    device_id: i32,
    out: *mut *mut kvb_cache,
) -> c_int {
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
        let store = match device {
            KVB_DEVICE_CPU => Store::Cpu(cache),
            #[cfg(feature = "cuda")]
            KVB_DEVICE_CUDA if device_id >= 0 => {
                let s = host_stream(std::ptr::null_mut());
                Store::Cuda(DeviceCache::from_host(&cache, device_id as usize, &s)?)
            }
            _ => make_store(cache.config().clone(), device, device_id)?,
        };
        *out = Box::into_raw(Box::new(kvb_cache {
            store,
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

/// `kvb_cache_append` on a CUDA cache, queued on `stream` (a `cudaStream_t`; NULL is the
/// default stream): the call returns once the work is queued, the rows are read in stream
/// order and not checked for NaN or infinities. `KVB_ERR_NO_CUDA` without CUDA.
///
/// # Safety
/// As `kvb_cache_append`; the rows stay valid until the stream reaches the call.
#[allow(clippy::too_many_arguments)] // the synchronous call's arguments and a stream
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_append_async(
    c: *mut kvb_cache,
    layer: i32,
    k: *const f32,
    v: *const f32,
    n_tokens: i32,
    modality: i32,
    saliency: *const f32,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    guard(|| unsafe {
        append(
            c,
            layer,
            k.cast(),
            v.cast(),
            false,
            n_tokens,
            modality,
            saliency,
            Some(stream),
        )
    })
}

/// `kvb_cache_append_f16` on a CUDA cache, queued on `stream`.
///
/// # Safety
/// As `kvb_cache_append_async`.
#[allow(clippy::too_many_arguments)] // the synchronous call's arguments and a stream
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_append_f16_async(
    c: *mut kvb_cache,
    layer: i32,
    k: *const u16,
    v: *const u16,
    n_tokens: i32,
    modality: i32,
    saliency: *const f32,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    guard(|| unsafe {
        append(
            c,
            layer,
            k.cast(),
            v.cast(),
            true,
            n_tokens,
            modality,
            saliency,
            Some(stream),
        )
    })
}

/// `kvb_cache_attn_decode` on a CUDA cache, queued on `stream`: `out` is written in stream
/// order.
///
/// # Safety
/// As `kvb_cache_attn_decode`; `q` and `out` stay valid until the stream reaches the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_attn_decode_async(
    c: *mut kvb_cache,
    layer: i32,
    q: *const f32,
    out: *mut f32,
    scale: f32,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    guard(|| unsafe { attn_decode(c, layer, q, out, scale, Some(stream)) })
}

/// `kvb_cache_dequantize` on a CUDA cache, on `stream`.
///
/// # Safety
/// As `kvb_cache_dequantize`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_dequantize_async(
    c: *mut kvb_cache,
    layer: i32,
    first: i64,
    n: i64,
    k_f16: *mut u16,
    v_f16: *mut u16,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    guard(|| unsafe { dequantize(c, layer, first, n, k_f16, v_f16, Some(stream)) })
}
