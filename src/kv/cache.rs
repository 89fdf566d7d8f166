//! `KvCache`: one sequence's quantized KV cache, per layer and KV head a list of blocks.
//!
//! Every append lands in an f16 residual first (KIVI's rule); then the tokens older than the
//! last `recent_f16` are quantized in token order, in blocks that never cross a span
//! (`store.rs`). Attention walks the blocks, then the residual, with an online softmax
//! (`attend.rs`). Presets and validation of the config are in `config.rs`; saving and loading
//! as a GGUF file in `snapshot.rs`.

mod attend;
mod config;
mod ledger;
mod snapshot;
mod store;

use half::f16;

use super::{BlockSize, FormatId, QuantParams};
use crate::Error;
pub(crate) use ledger::{Chunk, HeadBlocks, Mark, Masks, Run, memory_report};

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
    /// One block per span (a span longer than 4096 tokens, the formats' limit, is cut there).
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

/// One quantized block: the same tokens in every KV head of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Position of the block's first token.
    pub first: usize,
    pub n_tokens: usize,
    /// Index of the span the block belongs to, counted per layer in append order.
    pub span: usize,
    pub modality: Modality,
    pub k: FormatId,
    pub v: FormatId,
}

pub struct KvCache {
    cfg: CacheConfig,
    layers: Vec<Layer>,
    scratch: store::Scratch,
}

/// One layer: the block plan shared by its KV heads, the heads' bytes (`H`: in host memory
/// here, placed in a device arena by `cuda::cache`), and the residual's per-token bookkeeping.
pub(crate) struct Layer<H = Head> {
    pub(crate) n_tokens: usize,
    pub(crate) blocks: Vec<Block>,
    pub(crate) heads: Vec<H>,
    /// Spans (or their tails) still in the residual, oldest first.
    pub(crate) runs: Vec<Run>,
    /// Saliency of every residual token (0 where none was given).
    pub(crate) saliency: Vec<f32>,
    pub(crate) n_res: usize,
    pub(crate) n_spans: usize,
    /// The last span is text and further text appends extend it.
    pub(crate) open_text: bool,
}

/// One KV head of a layer: quantized blocks in one growing arena per role, and the f16
/// residual laid out as an `f16` block (`[t][d]`, little-endian).
#[derive(Default)]
pub(crate) struct Head {
    pub(crate) k: Vec<u8>,
    pub(crate) v: Vec<u8>,
    /// Where each block of `Layer::blocks` lies in the arenas.
    pub(crate) at: Vec<Stored>,
    pub(crate) k_res: Vec<u8>,
    pub(crate) v_res: Vec<u8>,
}

impl HeadBlocks for Head {
    fn stored(&self) -> &[Stored] {
        &self.at
    }
}

/// Where a block lies in a head's K and V arenas.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stored {
    pub(crate) k_off: usize,
    pub(crate) k: BlockSize,
    pub(crate) v_off: usize,
    pub(crate) v: BlockSize,
}

impl KvCache {
    pub fn new(cfg: CacheConfig) -> Result<KvCache, Error> {
        cfg.validate()?;
        let layers = (0..cfg.n_layer)
            .map(|_| Layer::empty((0..cfg.n_head_kv).map(|_| Head::default()).collect()))
            .collect();
        Ok(KvCache {
            cfg,
            layers,
            scratch: store::Scratch::default(),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// A cache made of `layers` (the device cache's copy in host memory).
    #[cfg(feature = "cuda")]
    pub(crate) fn from_layers(cfg: CacheConfig, layers: Vec<Layer>) -> Result<KvCache, Error> {
        cfg.validate()?;
        Ok(KvCache {
            cfg,
            layers,
            scratch: store::Scratch::default(),
        })
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn n_layer(&self) -> usize {
        self.cfg.n_layer
    }

    /// Tokens cached in `layer` (0 for a layer out of range).
    pub fn n_tokens(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.n_tokens)
    }

    /// Tokens of `layer` still in the f16 residual (0 for a layer out of range).
    pub fn n_residual(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.n_res)
    }

    /// The quantized blocks of `layer` in token order (empty for a layer out of range).
    pub fn blocks(&self, layer: usize) -> &[Block] {
        self.layers.get(layer).map_or(&[], |l| &l.blocks)
    }

    /// Exact bytes stored: block sizes as the formats report them, plus the f16 residual.
    pub fn memory(&self) -> MemoryReport {
        memory_report(&self.cfg, &self.layers)
    }

    fn layer(&self, layer: usize) -> Result<&Layer, Error> {
        self.layers.get(layer).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {layer} out of range (the cache has {} layers)",
                self.cfg.n_layer
            ))
        })
    }
}
