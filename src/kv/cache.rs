//! `KvCache`: one sequence's quantized KV cache, per layer and KV head a list of segments.
//! (API fixed; bodies being written.)

use half::f16;

use super::{FormatId, QuantParams};
use crate::Error;

/// Where a token came from: text tokens and visual (image/video) tokens can use different
/// formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Modality {
    Text,
    Visual,
}

/// How many tokens one quantized block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockTokens {
    /// At most this many (32..=4096).
    Fixed(usize),
    /// One block per appended span.
    All,
}

/// What a cache stores and how.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub k_text: FormatId,
    pub v_text: FormatId,
    pub k_visual: FormatId,
    pub v_visual: FormatId,
    pub block_tokens: BlockTokens,
    pub quant: QuantParams,
    /// CalibQuant score calibration on visual spans whose keys are q1_calib.
    pub calibrate: bool,
    pub calib_delta: f32,
    /// VidKV: top fraction of a visual span's tokens by saliency kept at 2 bits (0 = off).
    pub protect_fraction: f32,
    /// AKVQ-VL: tokens whose key norm exceeds this times the span's median are kept f16.
    pub pivot_factor: Option<f32>,
    /// Most recent tokens kept f16 (AKVQ-VL: 128).
    pub recent_f16: usize,
}

/// Input rows `[n_tokens][n_head_kv][head_dim]`.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Exact bytes held, by category.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryReport {
    pub codes: u64,
    pub meta: u64,
    pub residual: u64,
    pub total: u64,
    /// Effective bits per stored K value (all K bytes, residual included, over K values).
    pub bits_k: f64,
    pub bits_v: f64,
}

pub struct KvCache {
    cfg: CacheConfig,
}

impl CacheConfig {
    /// `calibquant`, `vidkv`, `akvq` or `kivi2` for a model of this shape.
    pub fn preset(
        name: &str,
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
    ) -> Result<CacheConfig, Error> {
        let _ = (name, n_layer, n_head_kv, head_dim);
        todo!()
    }

    /// The same K and V format for every token (`-ctk K -ctv V`).
    pub fn pair(
        k: FormatId,
        v: FormatId,
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
    ) -> CacheConfig {
        let _ = (k, v, n_layer, n_head_kv, head_dim);
        todo!()
    }
}

impl KvCache {
    pub fn new(cfg: CacheConfig) -> Result<KvCache, Error> {
        Ok(KvCache { cfg })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    pub fn append(
        &mut self,
        layer: usize,
        k: Rows<'_>,
        v: Rows<'_>,
        n_tokens: usize,
        modality: Modality,
        saliency: Option<&[f32]>,
    ) -> Result<(), Error> {
        let _ = (layer, k, v, n_tokens, modality, saliency);
        todo!()
    }

    pub fn n_tokens(&self, layer: usize) -> usize {
        let _ = layer;
        todo!()
    }

    /// Softmax attention of one new token: `q` and `out` are `[n_head][head_dim]`.
    pub fn attention_decode(
        &self,
        layer: usize,
        q: &[f32],
        n_head: usize,
        out: &mut [f32],
        scale: f32,
    ) -> Result<(), Error> {
        let _ = (layer, q, n_head, out, scale);
        todo!()
    }

    /// Causal attention of the last `n_q` cached tokens: `q` and `out` are `[n_q][n_head][head_dim]`;
    /// query `i` sees cached tokens `0..=n_tokens - n_q + i`.
    pub fn attention_prefill(
        &self,
        layer: usize,
        q: &[f32],
        n_q: usize,
        n_head: usize,
        out: &mut [f32],
        scale: f32,
    ) -> Result<(), Error> {
        let _ = (layer, q, n_q, n_head, out, scale);
        todo!()
    }

    /// Scores (logits after `scale` and calibration) of one query `[n_head][head_dim]` against
    /// every cached token, `[n_head][n_tokens]` in token order: what softmax is taken over.
    pub fn attention_scores(
        &self,
        layer: usize,
        q: &[f32],
        n_head: usize,
        scale: f32,
    ) -> Result<Vec<f32>, Error> {
        let _ = (layer, q, n_head, scale);
        todo!()
    }

    /// Tokens `first..first + n` of `layer` as f16 rows `[n][n_head_kv][head_dim]`.
    pub fn dequantize(
        &self,
        layer: usize,
        first: usize,
        n: usize,
        k: &mut [f16],
        v: &mut [f16],
    ) -> Result<(), Error> {
        let _ = (layer, first, n, k, v);
        todo!()
    }

    pub fn memory(&self) -> MemoryReport {
        todo!()
    }
}
