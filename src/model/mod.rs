//! A model's KV shape, read from its GGUF metadata: what a KV cache for it must hold.
//!
//! - [`ModelShape`]: from an LLM GGUF (`{arch}.block_count`, `{arch}.attention.*`, ...).
//! - [`VisionShape`]: from an mmproj (vision projector) GGUF: how many tokens an image costs.
//! - [`demo`]: writes small GGUF files of a real VLM's shape, for a first run with no download.

pub mod demo;
mod vision;

pub use vision::{COVERED_PROJECTORS, VisionShape};

use crate::Error;
use crate::gguf::{Gguf, GgufError, Value};
use crate::kv::{FormatId, HEAD_DIMS, Role};

/// The attention shape of an LLM.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    /// Query heads (the largest, where a file gives one count per layer).
    pub n_head: usize,
    /// KV heads of every layer (a file may give one value or one per layer).
    pub n_head_kv: Vec<usize>,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub context_length: u64,
    pub rope_dim: Option<u64>,
    pub rope_freq_base: Option<f64>,
    /// M-RoPE sections (time, height, width, extra) of Qwen2-VL-style models.
    pub rope_sections: Option<Vec<i64>>,
    /// Sliding-window size of models that interleave local attention layers (Gemma 3).
    pub sliding_window: Option<u64>,
}

/// Typed access to `{arch}.`-prefixed metadata with errors that name the key.
struct Keys<'g, 'a> {
    gguf: &'g Gguf<'a>,
    arch: &'g str,
}

impl<'a> Keys<'_, 'a> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn get(&self, suffix: &str) -> Option<Value<'a>> {
        self.gguf.get(&self.key(suffix))
    }

    fn bad(&self, suffix: &str, problem: impl Into<String>) -> Error {
        GgufError::Metadata {
            key: self.key(suffix),
            problem: problem.into(),
        }
        .into()
    }

    /// A non-negative integer written with any integer type.
    fn uint(&self, suffix: &str) -> Result<Option<u64>, Error> {
        match self.get(suffix) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Some(n) if (0..=u64::MAX as i128).contains(&n) => Ok(Some(n as u64)),
                _ => Err(self.bad(
                    suffix,
                    format!("expected a non-negative integer, found {v}"),
                )),
            },
        }
    }

    fn required(&self, suffix: &str) -> Result<u64, Error> {
        self.uint(suffix)?.ok_or_else(|| {
            self.bad(
                suffix,
                "missing: is this an LLM GGUF (not an mmproj or a LoRA)?",
            )
        })
    }

    /// A scalar, or an array with one entry per layer (`head_count_kv` of hybrid models).
    fn per_layer(&self, suffix: &str, n_layer: usize) -> Result<Option<Vec<usize>>, Error> {
        let Some(v) = self.get(suffix) else {
            return Ok(None);
        };
        if let Some(array) = v.as_array() {
            if array.len != n_layer {
                return Err(self.bad(
                    suffix,
                    format!("has {} entries for {n_layer} layers", array.len),
                ));
            }
            let ints = array
                .ints()
                .ok_or_else(|| self.bad(suffix, "expected integers"))?;
            return ints
                .into_iter()
                .map(|n| usize::try_from(n).map_err(|_| self.bad(suffix, format!("bad count {n}"))))
                .collect::<Result<Vec<_>, _>>()
                .map(Some);
        }
        let n = self.uint(suffix)?.unwrap_or_default();
        let n = usize::try_from(n).map_err(|_| self.bad(suffix, format!("bad count {n}")))?;
        Ok(Some(vec![n; n_layer]))
    }
}

/// Counts above this are not a real model: reject them before allocating per-layer tables.
const MAX_LAYERS: u64 = 1 << 16;

impl ModelShape {
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<ModelShape, Error> {
        let arch = gguf
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::from(GgufError::Metadata {
                    key: "general.architecture".into(),
                    problem: "missing or not a string".into(),
                })
            })?;
        if arch == "clip" {
            return Err(Error::InvalidArgument(
                "this is an mmproj (vision projector) file: pass it with --mmproj and give \
                 the LLM GGUF as the model"
                    .into(),
            ));
        }
        let keys = Keys { gguf, arch };
        let n_layer = keys.required("block_count")?;
        if n_layer == 0 || n_layer > MAX_LAYERS {
            return Err(keys.bad("block_count", format!("{n_layer} layers is not a model")));
        }
        let n_layer = n_layer as usize;
        let n_embd = keys.required("embedding_length")? as usize;
        let heads = keys
            .per_layer("attention.head_count", n_layer)?
            .ok_or_else(|| keys.bad("attention.head_count", "missing"))?;
        let n_head = heads.iter().copied().max().unwrap_or(0);
        if n_head == 0 {
            return Err(keys.bad("attention.head_count", "no attention heads"));
        }
        let n_head_kv = keys
            .per_layer("attention.head_count_kv", n_layer)?
            .unwrap_or(heads);
        let head_dim_k = match keys.uint("attention.key_length")? {
            Some(n) => n as usize,
            None => n_embd / n_head,
        };
        let head_dim_v = match keys.uint("attention.value_length")? {
            Some(n) => n as usize,
            None => n_embd / n_head,
        };
        let rope_sections = match keys.get("rope.dimension_sections") {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .and_then(|a| a.ints())
                    .ok_or_else(|| keys.bad("rope.dimension_sections", "expected integers"))?
                    .into_iter()
                    .map(|n| n as i64)
                    .collect(),
            ),
        };
        Ok(ModelShape {
            architecture: arch.to_owned(),
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            context_length: keys.required("context_length")?,
            rope_dim: keys.uint("rope.dimension_count")?,
            rope_freq_base: keys.get("rope.freq_base").and_then(|v| v.as_f64()),
            rope_sections,
            sliding_window: keys.uint("attention.sliding_window")?,
        })
    }

    /// The largest KV-head count of any layer.
    pub fn n_head_kv_max(&self) -> usize {
        self.n_head_kv.iter().copied().max().unwrap_or(0)
    }

    /// KV bytes one token costs with K stored as `k` and V as `v` at `block_tokens` per block:
    /// Σ over layers of n_head_kv · (head_dim_k · bits_K + head_dim_v · bits_V) / 8.
    /// `None` when a head dim is one the formats do not support.
    pub fn kv_bytes_per_token(&self, k: FormatId, v: FormatId, block_tokens: usize) -> Option<f64> {
        if !HEAD_DIMS.contains(&self.head_dim_k) || !HEAD_DIMS.contains(&self.head_dim_v) {
            return None;
        }
        let bits_k = k.bits_per_value(self.head_dim_k, Role::Key, block_tokens);
        let bits_v = v.bits_per_value(self.head_dim_v, Role::Value, block_tokens);
        let per_head = self.head_dim_k as f64 * bits_k + self.head_dim_v as f64 * bits_v;
        Some(
            self.n_head_kv
                .iter()
                .map(|&h| h as f64 * per_head / 8.0)
                .sum(),
        )
    }
}
