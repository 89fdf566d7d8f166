//! A model's KV shape from its GGUF file: what a host sizes its cache from.

use std::ffi::{CString, c_char, c_int};

use super::status::{Fail, KVB_ERR_UNSUPPORTED, arg, arg_mut, c_str, guard, guard_value};
use crate::gguf::GgufFile;
use crate::model::ModelShape;

/// An opened model: its KV shape (the file itself is not kept open).
pub struct kvb_model {
    shape: ModelShape,
    /// `shape.n_head_kv` as C reads it, owned here so `kvb_shape::n_head_kv` can point at it.
    n_head_kv: Vec<i32>,
    architecture: CString,
}

/// The attention shape of an LLM, as its GGUF metadata gives it.
#[repr(C)]
pub struct kvb_shape {
    pub n_layer: i32,
    /// Query heads (the largest, where the file gives one count per layer).
    pub n_head: i32,
    /// The largest KV-head count of any layer.
    pub n_head_kv_max: i32,
    /// KV heads of each layer, `n_layer` entries, owned by the model (valid until
    /// `kvb_model_free`).
    pub n_head_kv: *const i32,
    pub head_dim_k: i32,
    pub head_dim_v: i32,
    pub context_length: i64,
}

fn to_i32(n: usize, what: &str) -> Result<i32, Fail> {
    i32::try_from(n)
        .map_err(|_| Fail::new(KVB_ERR_UNSUPPORTED, format!("{what} = {n} is too large")))
}

/// Opens an LLM GGUF (only its header is read) and learns its KV shape.
///
/// # Safety
/// `gguf_path` must be NULL or a NUL-terminated string; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_model_open(
    gguf_path: *const c_char,
    out: *mut *mut kvb_model,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { arg_mut(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: the caller's contract.
        let path = unsafe { c_str(gguf_path, "gguf_path") }?;
        let file = GgufFile::open(path)?;
        let shape = ModelShape::from_gguf(&file.parse()?).map_err(|e| {
            let mut f = Fail::from(e);
            f.message = format!("{path}: {}", f.message);
            f
        })?;
        let n_head_kv = shape
            .n_head_kv
            .iter()
            .map(|&n| to_i32(n, "KV heads"))
            .collect::<Result<_, _>>()?;
        let architecture = CString::new(shape.architecture.replace('\0', "")).unwrap_or_default();
        *out = Box::into_raw(Box::new(kvb_model {
            shape,
            n_head_kv,
            architecture,
        }));
        Ok(())
    })
}

/// The model's KV shape; `out->n_head_kv` points into the model.
///
/// # Safety
/// `m` must be NULL or a model from `kvb_model_open`; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_model_shape(m: *const kvb_model, out: *mut kvb_shape) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let (m, out) = unsafe { (arg(m, "model")?, arg_mut(out, "out")?) };
        let s = &m.shape;
        *out = kvb_shape {
            n_layer: to_i32(s.n_layer, "n_layer")?,
            n_head: to_i32(s.n_head, "n_head")?,
            n_head_kv_max: to_i32(s.n_head_kv_max(), "n_head_kv")?,
            n_head_kv: m.n_head_kv.as_ptr(),
            head_dim_k: to_i32(s.head_dim_k, "head_dim_k")?,
            head_dim_v: to_i32(s.head_dim_v, "head_dim_v")?,
            context_length: i64::try_from(s.context_length).unwrap_or(i64::MAX),
        };
        Ok(())
    })
}

/// The model's `general.architecture` ("qwen2vl", "llama", ...), owned by the model;
/// NULL if `m` is NULL.
///
/// # Safety
/// `m` must be NULL or a model from `kvb_model_open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_model_architecture(m: *const kvb_model) -> *const c_char {
    guard_value(std::ptr::null(), || {
        // SAFETY: the caller's contract.
        Ok(unsafe { arg(m, "model") }?.architecture.as_ptr())
    })
}

/// Frees a model; NULL is a no-op.
///
/// # Safety
/// `m` must be NULL or a model from `kvb_model_open` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_model_free(m: *mut kvb_model) {
    guard(|| {
        if !m.is_null() {
            // SAFETY: made by Box::into_raw in kvb_model_open, freed once by the contract.
            drop(unsafe { Box::from_raw(m) });
        }
        Ok(())
    });
}

/// The model's shape as cache parameters need it, or why one cache cannot hold it.
pub(super) fn uniform_shape(m: &kvb_model) -> Result<(usize, usize, usize, usize), Fail> {
    let s = &m.shape;
    let hk = s.n_head_kv_max();
    if s.n_head_kv.iter().any(|&n| n != hk) {
        return Err(Fail::new(
            KVB_ERR_UNSUPPORTED,
            format!(
                "the model's layers have different KV-head counts ({:?}): make one cache per \
                 group of layers that share a count",
                s.n_head_kv
            ),
        ));
    }
    if s.head_dim_k != s.head_dim_v {
        return Err(Fail::new(
            KVB_ERR_UNSUPPORTED,
            format!(
                "key head dim {} differs from value head dim {}: a kvbits cache holds one head dim",
                s.head_dim_k, s.head_dim_v
            ),
        ));
    }
    Ok((s.n_layer, s.n_head, hk, s.head_dim_k))
}
