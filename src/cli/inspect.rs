//! `kvbits inspect`: a GGUF model's KV shape and what its KV cache costs in every cache type.

use std::path::PathBuf;

use kvbits::Error;
use kvbits::gguf::{Gguf, GgufFile, Value};
use kvbits::kv::{Applies, CacheConfig, FormatId, Modality};
use kvbits::model::{ModelShape, VisionShape, demo};
use serde_json::{Map, Value as Json, json};

/// Block size the KV-size table assumes (the cache's default).
const BLOCK_TOKENS: usize = 128;

#[derive(clap::Args)]
pub struct Args {
    /// LLM GGUF file. Without one, inspects a built-in demo of Qwen2.5-VL-7B's shape.
    model: Option<PathBuf>,
    /// Vision projector (mmproj) GGUF file.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// Context length for the KV-size table [default: the model's context length].
    #[arg(long)]
    ctx: Option<u64>,
    /// Images in that context (needs --mmproj): reported as visual tokens.
    #[arg(long, default_value_t = 0)]
    images: u64,
    /// Image size WxH in pixels for dynamic-resolution projectors [default: the encoder's].
    #[arg(long, value_parser = parse_size)]
    image_size: Option<(u64, u64)>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Print one metadata value in full and exit.
    #[arg(long)]
    key: Option<String>,
    /// List the tensors.
    #[arg(long)]
    tensors: bool,
    /// With no MODEL: keep the demo files in DIR instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    write_demo: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<(u64, u64), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or("expected WxH, e.g. 1280x720")?;
    let px = |v: &str| v.trim().parse::<u64>().map_err(|e| format!("{v}: {e}"));
    Ok((px(w)?, px(h)?))
}

pub fn run(args: Args) -> Result<(), Error> {
    let Some(model) = &args.model else {
        let (dir, keep) = match &args.write_demo {
            Some(dir) => (dir.clone(), true),
            None => (
                std::env::temp_dir().join(format!("kvbits-demo-{}", std::process::id())),
                false,
            ),
        };
        let (model, mmproj) = demo::write_demo(&dir)?;
        if !args.json && args.key.is_none() {
            println!(
                "No model given: inspecting the built-in demo, Qwen2.5-VL-7B's metadata{}.\n",
                if keep {
                    format!(" (written to {})", dir.display())
                } else {
                    String::new()
                }
            );
        }
        let result = inspect(&args, &model, Some(args.mmproj.clone().unwrap_or(mmproj)));
        if !keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return result;
    };
    inspect(&args, model, args.mmproj.clone())
}

fn inspect(args: &Args, model_path: &PathBuf, mmproj_path: Option<PathBuf>) -> Result<(), Error> {
    let file = GgufFile::open(model_path)?;
    let gguf = file.parse()?;
    if let Some(key) = &args.key {
        let value = gguf.get(key).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: no metadata key '{key}' (run without --key to list them)",
                model_path.display()
            ))
        })?;
        print_full(value);
        return Ok(());
    }
    let shape = ModelShape::from_gguf(&gguf).map_err(|e| in_file(e, model_path))?;
    let vision_file = mmproj_path.as_ref().map(GgufFile::open).transpose()?;
    let vision = match (&vision_file, &mmproj_path) {
        (Some(f), Some(p)) => {
            let g = f.parse()?;
            let v = VisionShape::from_gguf(&g).map_err(|e| in_file(e, p))?;
            let tokens = v
                .tokens_per_image(args.image_size)
                .map_err(|e| in_file(e, p))?;
            Some((v, tokens))
        }
        _ => None,
    };
    if args.images > 0 && vision.is_none() {
        return Err(Error::InvalidArgument(
            "--images needs --mmproj to know how many tokens an image takes".into(),
        ));
    }
    let ctx = args.ctx.unwrap_or(shape.context_length);
    let report = Report {
        gguf: &gguf,
        path: model_path,
        shape: &shape,
        vision: &vision,
        ctx,
        images: args.images,
    };
    if args.json {
        println!("{:#}", report.json());
    } else {
        report.print(args.tensors);
    }
    Ok(())
}

/// Prefix an error with the file it came from (GGUF errors already carry it).
fn in_file(e: Error, path: &std::path::Path) -> Error {
    match e {
        Error::Gguf(g) => Error::Gguf(g.in_file(path)),
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{}: {m}", path.display())),
        Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
        other => other,
    }
}

fn print_full(value: Value<'_>) {
    match value {
        Value::Array(a) => a.iter().for_each(|v| println!("{}", display_scalar(v))),
        v => println!("{}", display_scalar(v)),
    }
}

fn display_scalar(v: Value<'_>) -> String {
    match v {
        Value::String(s) => String::from_utf8_lossy(s).into_owned(),
        v => v.to_string(),
    }
}

/// One row of the KV-size table: K and V formats (a one-sided format pairs with f16).
fn type_rows() -> Vec<(String, FormatId, FormatId)> {
    FormatId::ALL
        .iter()
        .map(|&f| match f.info().applies {
            Applies::Both => (f.name().to_owned(), f, f),
            Applies::Keys => (format!("{f}/f16"), f, FormatId::F16),
            Applies::Values => (format!("f16/{f}"), FormatId::F16, f),
        })
        .collect()
}

struct Report<'r, 'a> {
    gguf: &'r Gguf<'a>,
    path: &'r PathBuf,
    shape: &'r ModelShape,
    vision: &'r Option<(VisionShape, u64)>,
    ctx: u64,
    images: u64,
}

impl Report<'_, '_> {
    fn print(&self, tensors: bool) {
        let s = self.shape;
        println!(
            "model    {} (GGUF v{}, {} tensors, {} metadata keys)",
            self.path.display(),
            self.gguf.version,
            self.gguf.tensors().len(),
            self.gguf.metadata().len()
        );
        let kv_heads = if s.n_head_kv.iter().all(|&h| h == s.n_head_kv[0]) {
            s.n_head_kv[0].to_string()
        } else {
            format!("{:?}", s.n_head_kv)
        };
        println!(
            "arch     {}: {} layers, {} query heads, {} KV heads, head dim {} (K) / {} (V)",
            s.architecture, s.n_layer, s.n_head, kv_heads, s.head_dim_k, s.head_dim_v
        );
        let mut rope = String::new();
        if let Some(base) = s.rope_freq_base {
            rope += &format!("rope base {base}");
        }
        if let Some(sec) = &s.rope_sections {
            rope += &format!(", M-RoPE sections {sec:?}");
        }
        if let Some(w) = s.sliding_window {
            rope += &format!(", sliding window {w}");
        }
        println!(
            "context  {} tokens{}",
            s.context_length,
            if rope.is_empty() {
                rope
            } else {
                format!("; {rope}")
            }
        );
        if let Some((v, tokens)) = self.vision {
            println!(
                "vision   {}: {} px, patch {}, merge {} -> {} tokens per image",
                v.projector_type,
                v.image_size,
                v.patch_size,
                v.spatial_merge_size.or(v.scale_factor).unwrap_or(1),
                tokens
            );
            if self.images > 0 {
                println!(
                    "         {} images = {} visual tokens of the {} in context",
                    self.images,
                    self.images * tokens,
                    self.ctx
                );
            }
        }
        println!();
        self.print_kv_table();
        if tensors {
            println!();
            println!(
                "{:<40} {:>8} {:>24} {:>14} {:>14}",
                "tensor", "type", "dims", "offset", "bytes"
            );
            for t in self.gguf.tensors() {
                println!(
                    "{:<40} {:>8} {:>24} {:>14} {:>14}",
                    t.name,
                    t.ty.name,
                    format!("{:?}", t.dims),
                    t.offset,
                    t.bytes
                );
            }
        }
    }

    fn print_kv_table(&self) {
        let s = self.shape;
        println!(
            "KV cache at {} tokens ({} tokens per quantized block):",
            self.ctx, BLOCK_TOKENS
        );
        println!(
            "{:<18} {:>7} {:>7} {:>13} {:>12} {:>7}",
            "cache type", "K bits", "V bits", "bytes/token", "total", "vs f16"
        );
        let f16 = s.kv_bytes_per_token(FormatId::F16, FormatId::F16, BLOCK_TOKENS);
        for (name, k, v) in type_rows() {
            let Some(bytes) = s.kv_bytes_per_token(k, v, BLOCK_TOKENS) else {
                println!(
                    "{name:<18} head dims {} (K) / {} (V) not supported by the formats",
                    s.head_dim_k, s.head_dim_v
                );
                continue;
            };
            println!(
                "{:<18} {:>7.3} {:>7.3} {:>13.1} {:>12} {:>6.2}x",
                name,
                k.bits_per_value(s.head_dim_k, kvbits::kv::Role::Key, BLOCK_TOKENS),
                v.bits_per_value(s.head_dim_v, kvbits::kv::Role::Value, BLOCK_TOKENS),
                bytes,
                human_bytes(bytes * self.ctx as f64),
                f16.unwrap_or(bytes) / bytes
            );
        }
        let visual = self.visual_tokens();
        println!(
            "\nPresets, with {visual} visual and {} text tokens:",
            self.ctx - visual.min(self.ctx)
        );
        for (name, total) in self.preset_totals() {
            let Some(total) = total else { continue };
            let per_token = total / self.ctx.max(1) as f64;
            println!(
                "{:<18} {:>7} {:>7} {:>13.1} {:>12} {:>6.2}x",
                name,
                "",
                "",
                per_token,
                human_bytes(total),
                f16.unwrap_or(per_token) / per_token
            );
        }
    }

    fn visual_tokens(&self) -> u64 {
        let per_image = self.vision.as_ref().map_or(0, |(_, t)| *t);
        (self.images * per_image).min(self.ctx)
    }

    /// KV bytes of the whole context under each preset: visual tokens in the preset's visual
    /// formats, text tokens in its text formats, its f16 window of recent tokens at f16
    /// (protected tokens, a small share, are not counted). `None` for unsupported head dims.
    fn preset_totals(&self) -> Vec<(&'static str, Option<f64>)> {
        let s = self.shape;
        let per_token = |(k, v): (FormatId, FormatId)| s.kv_bytes_per_token(k, v, BLOCK_TOKENS);
        CacheConfig::PRESETS
            .iter()
            .map(|&name| {
                let total =
                    CacheConfig::preset(name, s.n_layer, s.n_head_kv_max().max(1), s.head_dim_k)
                        .ok()
                        .and_then(|cfg| {
                            let recent = (cfg.recent_f16 as u64).min(self.ctx);
                            let visual = self.visual_tokens().min(self.ctx - recent);
                            let text = self.ctx - recent - visual;
                            Some(
                                text as f64 * per_token(cfg.formats(Modality::Text))?
                                    + visual as f64 * per_token(cfg.formats(Modality::Visual))?
                                    + recent as f64 * per_token((FormatId::F16, FormatId::F16))?,
                            )
                        });
                (name, total)
            })
            .collect()
    }

    fn json(&self) -> Json {
        let s = self.shape;
        let metadata: Map<String, Json> = self
            .gguf
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_string(), value_json(*v)))
            .collect();
        let tensors: Vec<Json> = self
            .gguf
            .tensors()
            .iter()
            .map(|t| {
                json!({"name": t.name, "type": t.ty.name, "dims": t.dims,
                       "offset": t.offset, "bytes": t.bytes})
            })
            .collect();
        let kv: Map<String, Json> = type_rows()
            .into_iter()
            .map(|(name, k, v)| (name, json!(s.kv_bytes_per_token(k, v, BLOCK_TOKENS))))
            .collect();
        let presets: Map<String, Json> = self
            .preset_totals()
            .into_iter()
            .map(|(name, total)| (name.to_owned(), json!(total)))
            .collect();
        let mut out = json!({
            "file": self.path,
            "version": self.gguf.version,
            "architecture": s.architecture,
            "n_layer": s.n_layer,
            "n_embd": s.n_embd,
            "n_head": s.n_head,
            "n_head_kv": s.n_head_kv,
            "head_dim_k": s.head_dim_k,
            "head_dim_v": s.head_dim_v,
            "context_length": s.context_length,
            "rope_freq_base": s.rope_freq_base,
            "rope_dimension_sections": s.rope_sections,
            "ctx": self.ctx,
            "block_tokens": BLOCK_TOKENS,
            "n_tensors": self.gguf.tensors().len(),
            "metadata": metadata,
            "tensors": tensors,
            "kv_bytes_per_token": kv,
            "visual_tokens": self.visual_tokens(),
            "preset_bytes_at_ctx": presets,
        });
        if let Some((v, tokens)) = self.vision {
            out["vision"] = json!({
                "projector_type": v.projector_type,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "scale_factor": v.scale_factor,
                "tokens_per_image": tokens,
            });
        }
        out
    }
}

/// Metadata as JSON; arrays longer than 16 elements as `{"type", "len"}`.
fn value_json(v: Value<'_>) -> Json {
    match v {
        Value::Array(a) if a.len > 16 => json!({"type": a.elem.name(), "len": a.len}),
        Value::Array(a) => Json::Array(a.iter().map(value_json).collect()),
        Value::String(s) => Json::String(String::from_utf8_lossy(s).into_owned()),
        Value::Bool(b) => Json::Bool(b),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        other => match other.as_int() {
            Some(i) if i >= 0 => json!(i as u64),
            Some(i) => json!(i as i64),
            None => Json::Null,
        },
    }
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}
