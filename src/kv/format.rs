//! The one trait every KV-cache format implements, and the table that lists them all.
//!
//! A *block* is `n` consecutive tokens of one KV head, `d` channels each, stored as one
//! contiguous byte string whose layout belongs to the format (see `docs/FORMATS.md`).
//! The implementations in `formats/` are plain scalar code: they are the ground truth that
//! every faster path (SIMD, CUDA) is tested against.

use crate::Error;

/// Which side of attention a block holds. Some formats quantize keys and values differently
/// (KIVI: keys per channel, values per token; CalibQuant: a different shrink factor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Key,
    Value,
}

/// Which roles a format is meant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applies {
    Keys,
    Values,
    Both,
}

impl Applies {
    /// The roles, keys first.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Applies::Keys => &[Role::Key],
            Applies::Values => &[Role::Value],
            Applies::Both => &[Role::Key, Role::Value],
        }
    }
}

/// The shape of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Tokens in the block, at least 1.
    pub n: usize,
    /// Channels per token (head dim).
    pub d: usize,
    pub role: Role,
}

/// Knobs a format reads while quantizing; the cache fills them from its config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    /// CalibQuant range shrink α for keys (the published 0.5).
    pub calib_alpha_k: f32,
    /// CalibQuant range shrink α for values (the published 0.3).
    pub calib_alpha_v: f32,
    /// VidKV key: fraction of channels (widest range first) kept at 2 bits, 0.25..=0.75.
    pub mix_fraction: f32,
    /// AKVQ-VL: clip of the per-group range before 2/4-bit min-max, as a fraction of min and max.
    pub had_clip: f32,
}

impl Default for QuantParams {
    fn default() -> Self {
        QuantParams {
            calib_alpha_k: 0.5,
            calib_alpha_v: 0.3,
            mix_fraction: 0.5,
            had_clip: 0.9,
        }
    }
}

/// Bytes of one stored block, split the way the cache reports memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockSize {
    /// Quantized codes (bits, nibbles, trits; f16 rows for f16 and kept tokens).
    pub codes: usize,
    /// Everything else: scales, minimums, masks, per-block headers.
    pub meta: usize,
}

impl BlockSize {
    pub fn total(self) -> usize {
        self.codes + self.meta
    }
}

/// One KV-cache format: quantize a block of tokens of one KV head, and use it in attention
/// without materialising more than a block's worth of values.
///
/// All slices are row-major: `x[t * d + c]` is channel `c` of token `t`.
pub trait Format: Sync + Send {
    /// Exact bytes of a block of `shape` in which `n_protected` tokens are protected
    /// (stored at higher precision; only formats with [`Format::protects`] use this), as
    /// `quantize` makes it with `params` (VidKV's key layout depends on its channel split).
    fn block_size(&self, shape: Shape, n_protected: usize, params: &QuantParams) -> BlockSize;

    /// Whether the format stores caller-chosen tokens at higher precision
    /// (`v1_58_tern`: salient tokens at 2 bits; `q2_had`/`q4_had`: pivot tokens at f16).
    fn protects(&self) -> bool {
        false
    }

    /// Quantize `x` (`shape.n * shape.d` finite values) and append the block to `out`;
    /// exactly `block_size(shape, n_protected).total()` bytes are appended.
    /// `protect` is empty or has one flag per token.
    fn quantize(
        &self,
        x: &[f32],
        shape: Shape,
        protect: &[bool],
        params: &QuantParams,
        out: &mut Vec<u8>,
    ) -> Result<(), Error>;

    /// Reconstruct the block into `out` (`n * d` values).
    fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]);

    /// `out[t] = q · x̂_t` for every token of the block, computed from the codes
    /// (post-scaling, query transforms) rather than by dequantizing.
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]);

    /// `out[c] += Σ_t p[t] · x̂_t[c]`.
    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]);
}

/// Every cache type kvbits knows. The discriminant is the type id of the C ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum FormatId {
    F16 = 0,
    Q8_0 = 1,
    Q4_0 = 2,
    Kivi2 = 3,
    Q1Calib = 4,
    K1_5Mix = 5,
    V1_58Tern = 6,
    Q2Had = 7,
    Q4Had = 8,
}

/// One row of the format table.
pub struct FormatInfo {
    pub id: FormatId,
    /// Name used on the command line (`-ctk q1_calib`) and in the C ABI.
    pub name: &'static str,
    pub applies: Applies,
    /// One line for `--help` and tables.
    pub summary: &'static str,
    pub imp: &'static dyn Format,
}

/// Head dims every format supports.
pub const HEAD_DIMS: [usize; 6] = [64, 80, 96, 112, 128, 256];

impl FormatId {
    pub const ALL: [FormatId; 9] = [
        FormatId::F16,
        FormatId::Q8_0,
        FormatId::Q4_0,
        FormatId::Kivi2,
        FormatId::Q1Calib,
        FormatId::K1_5Mix,
        FormatId::V1_58Tern,
        FormatId::Q2Had,
        FormatId::Q4Had,
    ];

    pub fn info(self) -> &'static FormatInfo {
        &super::FORMATS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn imp(self) -> &'static dyn Format {
        self.info().imp
    }

    pub fn from_id(id: i32) -> Option<FormatId> {
        FormatId::ALL.get(usize::try_from(id).ok()?).copied()
    }

    /// Parse a name as written on the command line; the error lists the valid names.
    pub fn from_name(name: &str) -> Result<FormatId, Error> {
        FormatId::ALL
            .iter()
            .copied()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = FormatId::ALL.iter().map(|f| f.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown cache type '{name}'; known types: {}",
                    names.join(", ")
                ))
            })
    }

    /// Effective bits per value of a full block with no protected tokens:
    /// every stored byte (codes and metadata) over the values it holds.
    pub fn bits_per_value(self, d: usize, role: Role, block_tokens: usize) -> f64 {
        let shape = Shape {
            n: block_tokens,
            d,
            role,
        };
        self.imp()
            .block_size(shape, 0, &QuantParams::default())
            .total() as f64
            * 8.0
            / (block_tokens * d) as f64
    }
}

impl std::fmt::Display for FormatId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The largest finite f16: KV values must lie within ±this.
pub const F16_MAX: f32 = 65504.0;

/// Checks every format does before quantizing: shape against the data, finite input.
#[inline]
pub fn check_input(x: &[f32], shape: Shape, protect: &[bool]) -> Result<(), Error> {
    if shape.n == 0 || shape.d == 0 {
        return Err(Error::InvalidArgument(format!(
            "empty block: {} tokens of {} channels",
            shape.n, shape.d
        )));
    }
    if !HEAD_DIMS.contains(&shape.d) {
        return Err(Error::Unsupported(format!(
            "head dim {} (supported: {HEAD_DIMS:?})",
            shape.d
        )));
    }
    if x.len() != shape.n * shape.d {
        return Err(Error::InvalidArgument(format!(
            "block of {} tokens x {} channels needs {} values, got {}",
            shape.n,
            shape.d,
            shape.n * shape.d,
            x.len()
        )));
    }
    if !protect.is_empty() && protect.len() != shape.n {
        return Err(Error::InvalidArgument(format!(
            "protect mask has {} entries for {} tokens",
            protect.len(),
            shape.n
        )));
    }
    // One pass without early exit (it vectorises); the scans below find the culprit.
    let out_of_range = x.chunks(64).any(|c| {
        c.iter()
            .fold(false, |bad, v| bad | v.is_nan() | (v.abs() > F16_MAX))
    });
    if !out_of_range {
        return Ok(());
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            token: i / shape.d,
            channel: i % shape.d,
        });
    }
    // Every format stores f16 (rows, scales, the residual): beyond its range nothing is exact.
    if let Some(i) = x.iter().position(|v| v.abs() > F16_MAX) {
        return Err(Error::InvalidArgument(format!(
            "value {} at token {}, channel {} is beyond the f16 range (±{F16_MAX}) of a KV cache",
            x[i],
            i / shape.d,
            i % shape.d
        )));
    }
    Ok(())
}
