//! What `kvbits bench --device cpu` and `cargo bench --bench cpu_decode` / `cpu_quantize`
//! measure, built in one place so that the two agree.

use crate::Error;
use crate::kv::{CacheConfig, FormatId, KvCache, Modality, QuantParams, Role, Rows, Shape};
use crate::rng::Rng;

/// Qwen2.5-VL-7B's attention layer: query heads, KV heads, head dim.
pub const SHAPE: (usize, usize, usize) = (28, 4, 128);

/// Cached tokens the targets are set at.
pub const TOKENS: [usize; 3] = [4096, 16384, 65536];

/// The rows of a decode table: our f16 first (the baseline), llama.cpp's two quantized
/// caches, then the presets.
pub const CONFIGS: [&str; 7] = [
    "f16",
    "q8_0",
    "q4_0",
    "calibquant",
    "vidkv",
    "akvq",
    "kivi2",
];

/// The cache of row `name` for `SHAPE`, one layer.
pub fn config(name: &str) -> Result<CacheConfig, Error> {
    let (_, hk, d) = SHAPE;
    match FormatId::from_name(name) {
        Ok(f) => Ok(CacheConfig::pair(f, f, 1, hk, d)),
        Err(_) => CacheConfig::preset(name, 1, hk, d),
    }
}

/// One layer of `tokens` visual tokens (a video's worth of one span) in cache `name`, from
/// seeded normal K and V, and a query for every head.
pub fn decode_cache(name: &str, tokens: usize, seed: u64) -> Result<(KvCache, Vec<f32>), Error> {
    let (nh, hk, d) = SHAPE;
    let mut rng = Rng::new(seed);
    let k = rng.normals(tokens * hk * d);
    let v = rng.normals(tokens * hk * d);
    let sal: Vec<f32> = (0..tokens).map(|_| rng.uniform()).collect();
    let mut cache = KvCache::new(config(name)?)?;
    let (k, v) = (Rows::F32(&k), Rows::F32(&v));
    cache.append(0, k, v, tokens, Modality::Visual, Some(&sal))?;
    Ok((cache, rng.normals(nh * d)))
}

/// Scale of the benchmarks' decode step.
pub fn scale() -> f32 {
    1.0 / (SHAPE.2 as f32).sqrt()
}

/// Quantize throughput is measured on blocks of this many tokens of one head (the presets'
/// block), over this many blocks.
pub const QUANT_BLOCK: usize = 128;
pub const QUANT_BLOCKS: usize = 64;

/// Every (format, role) a format applies to, with seeded input of `QUANT_BLOCKS` blocks.
pub fn quantize_inputs(seed: u64) -> Vec<(FormatId, Role, Vec<f32>)> {
    let d = SHAPE.2;
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for f in FormatId::ALL {
        for &role in f.info().applies.roles() {
            out.push((f, role, rng.normals(QUANT_BLOCKS * QUANT_BLOCK * d)));
        }
    }
    out
}

/// Quantize every block of `x` with `f` on this thread, as the cache does.
pub fn quantize_blocks(f: FormatId, role: Role, x: &[f32], out: &mut Vec<u8>) -> Result<(), Error> {
    let d = SHAPE.2;
    let shape = Shape {
        n: QUANT_BLOCK,
        d,
        role,
    };
    out.clear();
    let params = QuantParams::default();
    for block in x.chunks_exact(QUANT_BLOCK * d) {
        crate::kv::simd::quantize(f, block, shape, &[], &params, out)?;
    }
    Ok(())
}
