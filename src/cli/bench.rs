//! `kvbits bench`: decode-attention speed per preset against our own f16 path, measured in the
//! same run, on the GPU (`--device cuda`) or the CPU (`--device cpu`).

use std::time::Instant;

use kvbits::Error;
use kvbits::kv::{CacheConfig, KvCache, Modality, Rows};
use kvbits::rng::Rng;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
pub struct Args {
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// Cached tokens per sequence [default: 4096,16384,65536 (cpu); 4096,16384,65536,131072 (cuda)].
    #[arg(long, value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Sequences per decode call (cuda) [default: 1,8].
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Error> {
    match args.device {
        Device::Cpu => cpu(&args),
        Device::Cuda => cuda(&args),
    }
}

#[cfg(feature = "cuda")]
fn cuda(args: &Args) -> Result<(), Error> {
    use kvbits::cuda::{bench, device_count};
    if device_count() == 0 {
        return Err(Error::Unsupported("no CUDA device found".into()));
    }
    let tokens = if args.tokens.is_empty() {
        vec![4096, 16384, 65536, 131072]
    } else {
        args.tokens.clone()
    };
    let batch = if args.batch.is_empty() {
        vec![1, 8]
    } else {
        args.batch.clone()
    };
    let report = bench::run(&tokens, &batch)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
        return Ok(());
    }
    println!(
        "{}: copy bandwidth {:.0} GB/s (read + write, 1 GiB)\n",
        report.device, report.copy_gb_per_s
    );
    println!(
        "{:<15} {:>7} {:>5} {:<11} {:>9} {:>10} {:>8} {:>7} {:>8}",
        "decode", "tokens", "batch", "preset", "µs", "MB read", "GB/s", "% copy", "vs f16"
    );
    for r in &report.decode {
        println!(
            "{:<15} {:>7} {:>5} {:<11} {:>9.1} {:>10.1} {:>8.0} {:>6.1}% {:>7.2}x",
            r.shape,
            r.tokens,
            r.batch,
            r.preset,
            r.us,
            r.bytes as f64 / 1e6,
            r.gb_per_s,
            r.pct_of_copy,
            r.speedup_vs_f16
        );
    }
    println!(
        "\n{:<15} {:>7} {:<11} {:>9} {:>10} {:>8} {:>7}",
        "quantize", "tokens", "preset", "µs", "MB moved", "GB/s", "% copy"
    );
    for r in &report.quantize {
        println!(
            "{:<15} {:>7} {:<11} {:>9.1} {:>10.1} {:>8.0} {:>6.1}%",
            r.shape,
            r.tokens,
            r.preset,
            r.us,
            r.bytes as f64 / 1e6,
            r.gb_per_s,
            r.pct_of_copy
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Args) -> Result<(), Error> {
    Err(Error::Unsupported(
        "this kvbits was built without CUDA: rebuild with `--features cuda` \
         (see README, \"Build with CUDA\")"
            .into(),
    ))
}

/// One row of the CPU table.
#[derive(serde::Serialize)]
struct CpuRow {
    tokens: usize,
    preset: String,
    us: f64,
    bytes: u64,
    gb_per_s: f64,
    speedup_vs_f16: f64,
}

/// Qwen2.5-VL-7B's layer (28 query heads, 4 KV heads, D 128), batch 1: every token visual,
/// one decode step timed as the median of a few.
fn cpu(args: &Args) -> Result<(), Error> {
    let tokens = if args.tokens.is_empty() {
        vec![4096, 16384, 65536]
    } else {
        args.tokens.clone()
    };
    let (n_head, n_kv, d) = (28, 4, 128);
    let mut rng = Rng::new(11);
    let q = rng.normals(n_head * d);
    let mut rows = Vec::new();
    for &t in &tokens {
        let k = rng.normals(t * n_kv * d);
        let v = rng.normals(t * n_kv * d);
        let mut f16_us = None;
        let mut configs = vec![(
            "f16".to_string(),
            CacheConfig::pair(
                kvbits::kv::FormatId::F16,
                kvbits::kv::FormatId::F16,
                1,
                n_kv,
                d,
            ),
        )];
        for p in CacheConfig::PRESETS {
            configs.push((p.to_string(), CacheConfig::preset(p, 1, n_kv, d)?));
        }
        for (name, cfg) in configs {
            let mut cache = KvCache::new(cfg)?;
            cache.append(0, Rows::F32(&k), Rows::F32(&v), t, Modality::Visual, None)?;
            let mut out = vec![0f32; n_head * d];
            let reps = if t > 16384 { 3 } else { 7 };
            let mut times: Vec<f64> = (0..reps)
                .map(|_| {
                    let start = Instant::now();
                    cache
                        .attention_decode(0, &q, n_head, &mut out, 1.0 / (d as f32).sqrt())
                        .map(|_| start.elapsed().as_secs_f64() * 1e6)
                })
                .collect::<Result<_, _>>()?;
            times.sort_by(f64::total_cmp);
            let us = times[reps / 2];
            let bytes = cache.memory().total;
            let base = *f16_us.get_or_insert(us);
            rows.push(CpuRow {
                tokens: t,
                preset: name,
                us,
                bytes,
                gb_per_s: bytes as f64 / (us * 1e-6) / 1e9,
                speedup_vs_f16: base / us,
            });
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"device": "cpu", "shape": "Qwen2.5-VL-7B layer, batch 1", "rows": rows})
        );
        return Ok(());
    }
    println!("CPU, one thread, reference path; Qwen2.5-VL-7B layer (28/4 heads, D 128), batch 1\n");
    println!(
        "{:>7} {:<11} {:>11} {:>10} {:>7} {:>8}",
        "tokens", "preset", "µs", "MB read", "GB/s", "vs f16"
    );
    for r in &rows {
        println!(
            "{:>7} {:<11} {:>11.0} {:>10.1} {:>7.2} {:>7.2}x",
            r.tokens,
            r.preset,
            r.us,
            r.bytes as f64 / 1e6,
            r.gb_per_s,
            r.speedup_vs_f16
        );
    }
    Ok(())
}
