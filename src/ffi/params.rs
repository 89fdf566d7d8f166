//! Cache types by id and name, cache parameters, presets, and their translation to
//! [`CacheConfig`].

use std::ffi::{CString, c_char, c_int};
use std::sync::OnceLock;

use super::model::{kvb_model, uniform_shape};
use super::status::{Fail, arg, arg_mut, c_str, guard, guard_value};
use crate::kv::{BlockTokens, CacheConfig, FormatId};

pub const KVB_DEVICE_CPU: i32 = 0;
/// Device-resident cache on a CUDA GPU (not available yet: see `kvb_cache_new`).
pub const KVB_DEVICE_CUDA: i32 = 1;

pub const KVB_MODALITY_TEXT: i32 = 0;
pub const KVB_MODALITY_VISUAL: i32 = 1;

// Type ids: the discriminants of `FormatId` (tests/ffi.rs checks they agree).
pub const KVB_TYPE_F16: i32 = 0;
pub const KVB_TYPE_Q8_0: i32 = 1;
pub const KVB_TYPE_Q4_0: i32 = 2;
pub const KVB_TYPE_KIVI2: i32 = 3;
pub const KVB_TYPE_Q1_CALIB: i32 = 4;
pub const KVB_TYPE_K1_5_MIX: i32 = 5;
pub const KVB_TYPE_V1_58_TERN: i32 = 6;
pub const KVB_TYPE_Q2_HAD: i32 = 7;
pub const KVB_TYPE_Q4_HAD: i32 = 8;
pub const KVB_TYPE_COUNT: i32 = 9;

/// `block_tokens` value for one block per span (each visual span quantized whole).
pub const KVB_BLOCK_TOKENS_SPAN: i32 = -1;
/// `calibrate` value for CalibQuant's default: on where q1_calib holds visual keys.
pub const KVB_CALIBRATE_AUTO: i32 = -1;

/// What a cache stores and how. Start from `kvb_cache_params_default`, then a preset or type
/// ids, then the shape.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvb_cache_params {
    pub n_layer: i32,
    /// Query heads: `kvb_cache_attn_decode` reads `n_head * head_dim` query values.
    pub n_head: i32,
    pub n_head_kv: i32,
    pub head_dim: i32,
    /// Tokens per quantized block: 0 = default (128), 32..=4096, or `KVB_BLOCK_TOKENS_SPAN`.
    pub block_tokens: i32,
    pub type_k_text: i32,
    pub type_v_text: i32,
    pub type_k_visual: i32,
    pub type_v_visual: i32,
    /// CalibQuant score calibration of visual q1_calib spans: 0, 1 or `KVB_CALIBRATE_AUTO`.
    pub calibrate: i32,
    pub calib_delta: f32,
    /// VidKV: top fraction of a visual span's tokens by saliency kept at 2 bits (0 = off).
    pub protect_fraction: f32,
    /// `KVB_DEVICE_CPU` or `KVB_DEVICE_CUDA`.
    pub device: i32,
    pub device_id: i32,
    /// AKVQ-VL: tokens whose key norm exceeds this times the span's median stay f16 (0 = off).
    pub pivot_factor: f32,
    /// Most recent tokens kept f16 (AKVQ-VL: 128).
    pub recent_f16: i32,
}

fn type_id(f: FormatId) -> i32 {
    f as i32
}

fn format(id: i32, field: &str) -> Result<FormatId, Fail> {
    FormatId::from_id(id).ok_or_else(|| {
        Fail::invalid(format!(
            "{field} = {id} is not a cache type id (0..{KVB_TYPE_COUNT}; kvb_type_from_name \
             gives the id of a name)"
        ))
    })
}

fn count(n: i32, field: &str) -> Result<usize, Fail> {
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Fail::invalid(format!("{field} = {n}: it must be at least 1")))
}

/// Defaults: every type f16, default block size, calibration auto, CPU; shape fields 0
/// (to be set).
fn defaults() -> kvb_cache_params {
    let cfg = CacheConfig::pair(FormatId::F16, FormatId::F16, 1, 1, 128);
    let mut p = kvb_cache_params {
        n_layer: 0,
        n_head: 0,
        n_head_kv: 0,
        head_dim: 0,
        block_tokens: 0,
        type_k_text: 0,
        type_v_text: 0,
        type_k_visual: 0,
        type_v_visual: 0,
        calibrate: KVB_CALIBRATE_AUTO,
        calib_delta: 0.0,
        protect_fraction: 0.0,
        device: KVB_DEVICE_CPU,
        device_id: 0,
        pivot_factor: 0.0,
        recent_f16: 0,
    };
    set_knobs(&mut p, &cfg);
    p.calibrate = KVB_CALIBRATE_AUTO;
    p
}

/// Copies types and knobs (not the shape, block size or device) of `cfg` into `p`.
fn set_knobs(p: &mut kvb_cache_params, cfg: &CacheConfig) {
    p.type_k_text = type_id(cfg.k_text);
    p.type_v_text = type_id(cfg.v_text);
    p.type_k_visual = type_id(cfg.k_visual);
    p.type_v_visual = type_id(cfg.v_visual);
    p.calibrate = cfg.calibrate as i32;
    p.calib_delta = cfg.calib_delta;
    p.protect_fraction = cfg.protect_fraction;
    p.pivot_factor = cfg.pivot_factor.unwrap_or(0.0);
    p.recent_f16 = cfg.recent_f16 as i32;
}

/// The parameters of a cache (`n_head` is the caller's).
pub(super) fn from_config(cfg: &CacheConfig, n_head: usize) -> kvb_cache_params {
    let mut p = defaults();
    set_knobs(&mut p, cfg);
    p.n_layer = cfg.n_layer as i32;
    p.n_head = n_head as i32;
    p.n_head_kv = cfg.n_head_kv as i32;
    p.head_dim = cfg.head_dim as i32;
    p.block_tokens = match cfg.block_tokens {
        BlockTokens::Fixed(n) => n as i32,
        BlockTokens::All => KVB_BLOCK_TOKENS_SPAN,
    };
    p
}

/// The config `p` describes and its query-head count, every field checked (the device too:
/// that is the caller's).
pub(super) fn to_config(p: &kvb_cache_params) -> Result<(CacheConfig, usize), Fail> {
    let n_layer = count(p.n_layer, "n_layer")?;
    let n_head = count(p.n_head, "n_head")?;
    let n_head_kv = count(p.n_head_kv, "n_head_kv")?;
    let head_dim = count(p.head_dim, "head_dim")?;
    if n_head % n_head_kv != 0 {
        return Err(Fail::invalid(format!(
            "n_head = {n_head} is not a multiple of n_head_kv = {n_head_kv}"
        )));
    }
    let k = format(p.type_k_text, "type_k_text")?;
    let v = format(p.type_v_text, "type_v_text")?;
    let mut cfg = CacheConfig::pair(k, v, n_layer, n_head_kv, head_dim);
    cfg.k_visual = format(p.type_k_visual, "type_k_visual")?;
    cfg.v_visual = format(p.type_v_visual, "type_v_visual")?;
    cfg.block_tokens = match p.block_tokens {
        0 => cfg.block_tokens,
        KVB_BLOCK_TOKENS_SPAN => BlockTokens::All,
        n if n > 0 => BlockTokens::Fixed(n as usize),
        n => {
            return Err(Fail::invalid(format!(
                "block_tokens = {n}: use 0 (default), 32..=4096, or KVB_BLOCK_TOKENS_SPAN"
            )));
        }
    };
    cfg.calibrate = match p.calibrate {
        KVB_CALIBRATE_AUTO => cfg.k_visual == FormatId::Q1Calib,
        0 => false,
        1 => true,
        n => {
            return Err(Fail::invalid(format!(
                "calibrate = {n}: use 0, 1 or KVB_CALIBRATE_AUTO"
            )));
        }
    };
    cfg.calib_delta = p.calib_delta;
    cfg.protect_fraction = p.protect_fraction;
    cfg.pivot_factor = match p.pivot_factor {
        0.0 => None,
        f => Some(f),
    };
    cfg.recent_f16 = usize::try_from(p.recent_f16)
        .map_err(|_| Fail::invalid(format!("recent_f16 = {}: it must be >= 0", p.recent_f16)))?;
    cfg.validate()?;
    Ok((cfg, n_head))
}

/// Default parameters: every type f16, block size default, calibration auto, CPU, and the
/// shape fields 0, to be set (or filled by `kvb_cache_params_for_model`).
///
/// # Safety
/// `p` must be NULL (a no-op) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_params_default(p: *mut kvb_cache_params) {
    guard(|| {
        // SAFETY: the caller's contract.
        *unsafe { arg_mut(p, "params") }? = defaults();
        Ok(())
    });
}

/// Sets the types and knobs of a preset ("calibquant", "vidkv", "akvq", "kivi2"), leaving
/// the shape, block size and device as they are.
///
/// # Safety
/// `name` must be NULL or NUL-terminated; `inout` NULL or a valid, writable params struct.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_preset(
    name: *const c_char,
    inout: *mut kvb_cache_params,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let (name, p) = unsafe { (c_str(name, "preset name")?, arg_mut(inout, "params")?) };
        // The knobs do not depend on the shape: any valid one will do.
        let cfg = CacheConfig::preset(name, 1, 1, 128)?;
        set_knobs(p, &cfg);
        Ok(())
    })
}

/// Fills the shape fields (n_layer, n_head, n_head_kv, head_dim) from a model; fails with
/// `KVB_ERR_UNSUPPORTED` where one cache cannot hold it (KV-head counts that differ by layer,
/// key and value head dims that differ).
///
/// # Safety
/// `m` must be NULL or a model from `kvb_model_open`; `inout` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_cache_params_for_model(
    m: *const kvb_model,
    inout: *mut kvb_cache_params,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let (m, p) = unsafe { (arg(m, "model")?, arg_mut(inout, "params")?) };
        let (n_layer, n_head, n_head_kv, head_dim) = uniform_shape(m)?;
        let int = |n: usize| i32::try_from(n).map_err(|_| Fail::invalid("model shape too large"));
        p.n_layer = int(n_layer)?;
        p.n_head = int(n_head)?;
        p.n_head_kv = int(n_head_kv)?;
        p.head_dim = int(head_dim)?;
        Ok(())
    })
}

/// The id of a cache type by name ("f16", "q8_0", "q4_0", "kivi2", "q1_calib", "k1_5_mix",
/// "v1_58_tern", "q2_had", "q4_had").
///
/// # Safety
/// `name` must be NULL or NUL-terminated; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_type_from_name(name: *const c_char, out: *mut i32) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let (name, out) = unsafe { (c_str(name, "type name")?, arg_mut(out, "out")?) };
        *out = type_id(FormatId::from_name(name)?);
        Ok(())
    })
}

/// The name of a cache type id (a static string), or NULL for an unknown id.
#[unsafe(no_mangle)]
pub extern "C" fn kvb_type_name(ty: i32) -> *const c_char {
    static NAMES: OnceLock<Vec<CString>> = OnceLock::new();
    guard_value(std::ptr::null(), || {
        let f = format(ty, "type")?;
        let names = NAMES.get_or_init(|| {
            FormatId::ALL
                .iter()
                .map(|f| CString::new(f.name()).expect("format names have no NUL"))
                .collect()
        });
        Ok(names[f as usize].as_ptr())
    })
}
