//! Presets, validation and display of [`CacheConfig`].

use std::fmt;

use super::{BlockTokens, CacheConfig, Modality};
use crate::Error;
use crate::kv::{Applies, FormatId, HEAD_DIMS, QuantParams};

/// Most tokens in one block: the formats' limit, and where spans are cut under
/// [`BlockTokens::All`].
const MAX_BLOCK: usize = 4096;

impl CacheConfig {
    /// The names [`CacheConfig::preset`] knows.
    pub const PRESETS: [&'static str; 4] = ["calibquant", "vidkv", "akvq", "kivi2"];

    /// `calibquant`, `vidkv`, `akvq` or `kivi2` for a model of this shape.
    pub fn preset(
        name: &str,
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
    ) -> Result<CacheConfig, Error> {
        use FormatId::*;
        let pair = |k, v| CacheConfig::pair(k, v, n_layer, n_head_kv, head_dim);
        let cfg = match name {
            "calibquant" => CacheConfig {
                k_visual: Q1Calib,
                v_visual: Q1Calib,
                calibrate: true,
                ..pair(F16, F16)
            },
            "vidkv" => CacheConfig {
                protect_fraction: 0.2,
                ..pair(K1_5Mix, V1_58Tern)
            },
            "akvq" => CacheConfig {
                k_visual: Q2Had,
                v_visual: Q2Had,
                pivot_factor: Some(6.0),
                recent_f16: 128,
                ..pair(Q4Had, Q4Had)
            },
            "kivi2" => pair(Kivi2, Kivi2),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown cache preset '{name}'; presets: {}",
                    Self::PRESETS.join(", ")
                )));
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same K and V format for every token (`-ctk K -ctv V`).
    pub fn pair(
        k: FormatId,
        v: FormatId,
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
    ) -> CacheConfig {
        CacheConfig {
            n_layer,
            n_head_kv,
            head_dim,
            k_text: k,
            v_text: v,
            k_visual: k,
            v_visual: v,
            block_tokens: BlockTokens::Fixed(128),
            quant: QuantParams::default(),
            // CalibQuant's calibration is on by default wherever q1_calib holds visual keys.
            calibrate: k == FormatId::Q1Calib,
            calib_delta: 3.0,
            protect_fraction: 0.0,
            pivot_factor: None,
            recent_f16: 0,
        }
    }

    /// Every check [`KvCache::new`](super::KvCache::new) makes, with a message naming the
    /// field at fault.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if self.n_layer == 0 || self.n_head_kv == 0 {
            return bad(format!(
                "a cache needs at least one layer and one KV head (got {} layers, {} KV heads)",
                self.n_layer, self.n_head_kv
            ));
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::Unsupported(format!(
                "head dim {} (supported: {HEAD_DIMS:?})",
                self.head_dim
            )));
        }
        if let BlockTokens::Fixed(n) = self.block_tokens
            && !(32..=MAX_BLOCK).contains(&n)
        {
            return bad(format!("block_tokens {n} is outside 32..={MAX_BLOCK}"));
        }
        for (f, side, wrong, only) in [
            (self.k_text, "keys (text)", Applies::Values, "value"),
            (self.k_visual, "keys (visual)", Applies::Values, "value"),
            (self.v_text, "values (text)", Applies::Keys, "key"),
            (self.v_visual, "values (visual)", Applies::Keys, "key"),
        ] {
            if f.info().applies == wrong {
                return bad(format!(
                    "{f} is a {only}-only format and cannot store {side}"
                ));
            }
        }
        let q = &self.quant;
        for (name, x, lo, hi, lo_open) in [
            ("protect_fraction", self.protect_fraction, 0.0, 1.0, false),
            ("quant.calib_alpha_k", q.calib_alpha_k, 0.0, 1.0, true),
            ("quant.calib_alpha_v", q.calib_alpha_v, 0.0, 1.0, true),
            ("quant.mix_fraction", q.mix_fraction, 0.25, 0.75, false),
            ("quant.had_clip", q.had_clip, 0.0, 1.0, true),
        ] {
            // Written so that NaN fails too.
            let inside = if lo_open { x > lo } else { x >= lo } && x <= hi;
            if !inside {
                let open = if lo_open { "(" } else { "[" };
                return bad(format!("{name} = {x} is outside {open}{lo}, {hi}]"));
            }
        }
        if !(self.calib_delta.is_finite() && self.calib_delta >= 0.0) {
            return bad(format!(
                "calib_delta = {} must be finite and >= 0",
                self.calib_delta
            ));
        }
        if let Some(f) = self.pivot_factor
            && !(f.is_finite() && f > 0.0)
        {
            return bad(format!("pivot_factor = {f} must be finite and > 0"));
        }
        Ok(())
    }

    /// K and V format of a modality.
    pub fn formats(&self, modality: Modality) -> (FormatId, FormatId) {
        match modality {
            Modality::Text => (self.k_text, self.v_text),
            Modality::Visual => (self.k_visual, self.v_visual),
        }
    }

    /// Most tokens in one block.
    pub(crate) fn block_len(&self) -> usize {
        match self.block_tokens {
            BlockTokens::Fixed(n) => n,
            // One block per span, within the formats' limit; a text span, which may grow,
            // is quantized once closed or at the limit.
            BlockTokens::All => MAX_BLOCK,
        }
    }
}

impl fmt::Display for CacheConfig {
    /// One line, e.g. `K f16/q1_calib V f16/q1_calib (text/visual), blocks 128, calibrate δ=3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |t: FormatId, v: FormatId| {
            if t == v {
                t.to_string()
            } else {
                format!("{t}/{v}")
            }
        };
        write!(
            f,
            "K {} V {}",
            side(self.k_text, self.k_visual),
            side(self.v_text, self.v_visual)
        )?;
        if self.k_text != self.k_visual || self.v_text != self.v_visual {
            f.write_str(" (text/visual)")?;
        }
        match self.block_tokens {
            BlockTokens::Fixed(n) => write!(f, ", blocks {n}")?,
            BlockTokens::All => f.write_str(", one block per span")?,
        }
        if self.recent_f16 > 0 {
            write!(f, ", last {} f16", self.recent_f16)?;
        }
        if self.calibrate {
            write!(f, ", calibrate δ={}", self.calib_delta)?;
        }
        if self.protect_fraction > 0.0 {
            write!(
                f,
                ", protect top {}% salient",
                self.protect_fraction * 100.0
            )?;
        }
        if let Some(p) = self.pivot_factor {
            write!(f, ", pivots > {p}x median key norm")?;
        }
        Ok(())
    }
}
