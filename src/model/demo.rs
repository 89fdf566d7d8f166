//! A built-in demo: GGUF files with the metadata of Qwen2.5-VL-7B-Instruct and its mmproj,
//! written by our own writer, so `kvbits inspect` shows real output with no download.
//! Tensors are a small stand-in set (the metadata is what the KV shape comes from).

use std::path::{Path, PathBuf};

use crate::Error;
use crate::gguf::{GgmlType, GgufError, GgufWriter, MetaValue, ValueType};

pub const DEMO_MODEL: &str = "qwen2.5-vl-7b-demo.gguf";
pub const DEMO_MMPROJ: &str = "mmproj-qwen2.5-vl-7b-demo.gguf";

/// Write the demo LLM and mmproj into `dir`; returns their paths.
pub fn write_demo(dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.into(),
        source,
    })?;
    let model = dir.join(DEMO_MODEL);
    let mmproj = dir.join(DEMO_MMPROJ);
    llm()?.write_file(&model)?;
    vision()?.write_file(&mmproj)?;
    Ok((model, mmproj))
}

fn f32s(values: &[f32]) -> MetaValue {
    MetaValue::Array(
        ValueType::F32,
        values.iter().map(|&v| MetaValue::F32(v)).collect(),
    )
}

fn i32s(values: &[i32]) -> MetaValue {
    MetaValue::Array(
        ValueType::I32,
        values.iter().map(|&v| MetaValue::I32(v)).collect(),
    )
}

/// A tensor of `dims` filled with a small deterministic pattern.
fn tensor(w: &mut GgufWriter, name: &str, ty: &str, dims: &[u64]) -> Result<(), GgufError> {
    let ty = GgmlType::from_name(ty).expect("demo uses known types");
    let n: u64 = dims.iter().product();
    let bytes = ty
        .tensor_bytes(dims[0], n)
        .expect("demo dims fill whole blocks");
    let data = (0..bytes).map(|i| (i * 37 % 251) as u8).collect();
    w.add_tensor(name, ty, dims, data)?;
    Ok(())
}

fn llm() -> Result<GgufWriter, GgufError> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "qwen2vl")?
        .add(
            "general.name",
            "Qwen2.5-VL-7B-Instruct (kvbits demo: real metadata, stand-in tensors)",
        )?
        .add("general.file_type", 15u32)?
        .add("general.quantization_version", 2u32)?
        .add("qwen2vl.block_count", 28u32)?
        .add("qwen2vl.context_length", 128000u32)?
        .add("qwen2vl.embedding_length", 3584u32)?
        .add("qwen2vl.feed_forward_length", 18944u32)?
        .add("qwen2vl.attention.head_count", 28u32)?
        .add("qwen2vl.attention.head_count_kv", 4u32)?
        .add("qwen2vl.attention.layer_norm_rms_epsilon", 1e-6f32)?
        .add("qwen2vl.rope.freq_base", 1_000_000f32)?
        .add("qwen2vl.rope.dimension_sections", i32s(&[16, 24, 24, 0]))?
        .add("tokenizer.ggml.model", "gpt2")?
        .add("tokenizer.ggml.pre", "qwen2")?
        .add(
            "tokenizer.ggml.tokens",
            MetaValue::strings([
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|image_pad|>",
                "<|video_pad|>",
                "Hello",
                "Ġworld",
            ]),
        )?
        .add("tokenizer.ggml.eos_token_id", 151645u32)?
        .add("tokenizer.ggml.add_bos_token", false)?;
    // Stand-ins at 1/56 of the real width: the names and types are Qwen2.5-VL's.
    tensor(&mut w, "token_embd.weight", "Q4_K", &[256, 64])?;
    for layer in 0..2 {
        for (name, ty) in [("attn_q", "Q4_K"), ("attn_k", "Q4_K"), ("attn_v", "Q6_K")] {
            tensor(
                &mut w,
                &format!("blk.{layer}.{name}.weight"),
                ty,
                &[256, 16],
            )?;
        }
        tensor(
            &mut w,
            &format!("blk.{layer}.attn_norm.weight"),
            "F32",
            &[64],
        )?;
    }
    tensor(&mut w, "output_norm.weight", "F32", &[64])?;
    Ok(w)
}

fn vision() -> Result<GgufWriter, GgufError> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "clip")?
        .add(
            "general.name",
            "Qwen2.5-VL-7B-Instruct mmproj (kvbits demo)",
        )?
        .add("clip.projector_type", "qwen2.5vl_merger")?
        .add("clip.has_vision_encoder", true)?
        .add("clip.has_text_encoder", false)?
        .add("clip.vision.image_size", 560u32)?
        .add("clip.vision.patch_size", 14u32)?
        .add("clip.vision.spatial_merge_size", 2u32)?
        .add("clip.vision.embedding_length", 1280u32)?
        .add("clip.vision.feed_forward_length", 3420u32)?
        .add("clip.vision.block_count", 32u32)?
        .add("clip.vision.attention.head_count", 16u32)?
        .add("clip.vision.attention.layer_norm_epsilon", 1e-6f32)?
        .add("clip.vision.projection_dim", 3584u32)?
        .add("clip.vision.n_wa_pattern", 8u32)?
        .add(
            "clip.vision.image_mean",
            f32s(&[0.481_454_66, 0.457_827_5, 0.408_210_73]),
        )?
        .add(
            "clip.vision.image_std",
            f32s(&[0.268_629_54, 0.261_302_6, 0.275_777_1]),
        )?
        .add("clip.use_silu", true)?;
    tensor(&mut w, "v.patch_embd.weight", "F16", &[14, 14, 3, 16])?;
    tensor(&mut w, "mm.0.weight", "F16", &[64, 64])?;
    Ok(w)
}
