//! The vision side of a VLM, from its mmproj GGUF: how many LLM tokens one image becomes.

use crate::Error;
use crate::gguf::{Gguf, GgufError, Value};

/// What an mmproj file says about its vision encoder and projector.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionShape {
    pub projector_type: String,
    pub has_vision_encoder: bool,
    /// Side of the square input the encoder was trained at, in pixels.
    pub image_size: u64,
    pub patch_size: u64,
    /// Patches merged per side into one token (Qwen2-VL, Pixtral).
    pub spatial_merge_size: Option<u64>,
    /// Pixel-shuffle factor per side (InternVL, Idefics3).
    pub scale_factor: Option<u64>,
    pub n_embd: Option<u64>,
    pub n_layer: Option<u64>,
}

/// Projector types whose token count kvbits knows, as llama.cpp's mtmd names them.
pub const COVERED_PROJECTORS: &[&str] = &[
    "qwen2vl_merger",
    "qwen2.5vl_merger",
    "qwen3vl_merger",
    "internvl",
    "mlp",
    "mlp_norm",
    "ldp",
    "ldpv2",
    "gemma3",
    "idefics3",
    "pixtral",
    "llama4",
];

fn meta_err(key: &str, problem: impl Into<String>) -> Error {
    GgufError::Metadata {
        key: key.into(),
        problem: problem.into(),
    }
    .into()
}

fn uint(gguf: &Gguf<'_>, key: &str) -> Result<Option<u64>, Error> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => match v.as_int() {
            Some(n) if (1..=u32::MAX as i128).contains(&n) => Ok(Some(n as u64)),
            _ => Err(meta_err(
                key,
                format!("expected a positive integer, found {v}"),
            )),
        },
    }
}

impl VisionShape {
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<VisionShape, Error> {
        // Files with audio and vision name the vision projector separately.
        let projector_type = ["clip.vision.projector_type", "clip.projector_type"]
            .iter()
            .find_map(|k| gguf.get(k).and_then(|v| v.as_str()))
            .ok_or_else(|| {
                meta_err(
                    "clip.projector_type",
                    "missing: is this an mmproj (vision projector) GGUF?",
                )
            })?;
        let has_vision_encoder = match gguf.get("clip.has_vision_encoder") {
            Some(Value::Bool(b)) => b,
            None => true,
            Some(v) => {
                return Err(meta_err(
                    "clip.has_vision_encoder",
                    format!("not a bool: {v}"),
                ));
            }
        };
        if !has_vision_encoder {
            return Err(Error::Unsupported(
                "this mmproj has no vision encoder (clip.has_vision_encoder is false)".into(),
            ));
        }
        let required = |key: &str| {
            uint(gguf, key)?.ok_or_else(|| meta_err(key, "missing from the mmproj file"))
        };
        Ok(VisionShape {
            projector_type: projector_type.to_owned(),
            has_vision_encoder,
            image_size: required("clip.vision.image_size")?,
            patch_size: required("clip.vision.patch_size")?,
            spatial_merge_size: uint(gguf, "clip.vision.spatial_merge_size")?,
            scale_factor: uint(gguf, "clip.vision.projector.scale_factor")?,
            n_embd: uint(gguf, "clip.vision.embedding_length")?,
            n_layer: uint(gguf, "clip.vision.block_count")?,
        })
    }

    /// LLM tokens one image of `width` x `height` pixels produces (the encoder's square
    /// `image_size` when `None`). Fixed-resolution projectors ignore the size.
    pub fn tokens_per_image(&self, size: Option<(u64, u64)>) -> Result<u64, Error> {
        let (w, h) = size.unwrap_or((self.image_size, self.image_size));
        if w == 0 || h == 0 {
            return Err(Error::InvalidArgument(format!("image size {w}x{h}")));
        }
        let patches_per_side = self.image_size / self.patch_size;
        let square = patches_per_side * patches_per_side;
        let per_side =
            |pixels: u64, unit: u64| (pixels as f64 / unit as f64).round().max(1.0) as u64;
        Ok(match self.projector_type.as_str() {
            // Dynamic resolution: the image is resized to a multiple of patch·merge
            // (Qwen's smart_resize rounds to nearest), one token per merged patch.
            "qwen2vl_merger" | "qwen2.5vl_merger" | "qwen3vl_merger" => {
                let unit = self.patch_size * self.spatial_merge_size.unwrap_or(2);
                per_side(w, unit) * per_side(h, unit)
            }
            // One tile of image_size pixels per side, pixel-shuffled by scale_factor; larger
            // images are cut into tiles plus a thumbnail.
            "internvl" => {
                let s = self.scale_factor.unwrap_or(2);
                let per_tile = square / (s * s);
                let tiles = w.div_ceil(self.image_size) * h.div_ceil(self.image_size);
                per_tile * if tiles > 1 { tiles + 1 } else { 1 }
            }
            "idefics3" => {
                let s = self.scale_factor.unwrap_or(2);
                square / (s * s)
            }
            // LLaVA-1.5: every patch is a token (576 at 336/14).
            "mlp" | "mlp_norm" => square,
            // MobileVLM and Llama 4 pool 2x2.
            "ldp" | "ldpv2" | "llama4" => square / 4,
            // Gemma 3: a fixed 256 soft tokens per image.
            "gemma3" => 256,
            // Pixtral / Mistral 3: scaled down (aspect kept) to fit image_size on the longest
            // side, then merged patches row by row, plus one break token per row.
            "pixtral" => {
                let unit = self.patch_size * self.spatial_merge_size.unwrap_or(1);
                let ratio = (w.max(h) as f64 / self.image_size as f64).max(1.0);
                let fit = |px: u64| ((px as f64 / ratio).floor() as u64).max(1);
                let (cols, rows) = (fit(w).div_ceil(unit), fit(h).div_ceil(unit));
                rows * (cols + 1)
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "projector type '{other}': kvbits knows the token counts of {}",
                    COVERED_PROJECTORS.join(", ")
                )));
            }
        })
    }
}
