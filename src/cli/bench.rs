//! `kvbits bench`: decode-attention speed per preset against our own f16 path, measured in the
//! same run, on the GPU (`--device cuda`) or the CPU (`--device cpu`).

use std::time::Instant;

use kvbits::Error;

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
    /// Presets to time besides f16, e.g. `kivi2,akvq` (cuda) [default: all].
    #[arg(long, value_delimiter = ',')]
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    preset: Vec<String>,
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
    let report = bench::run(&tokens, &batch, &args.preset)?;
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
    println!(
        "\ncache step: a {}-token text prompt, then `tokens` visual tokens, one DeviceCache",
        bench::PROMPT
    );
    println!(
        "{:<15} {:>7} {:<11} {:>9} {:>10} {:>11} {:>10} {:>8}",
        "cache step",
        "tokens",
        "preset",
        "step µs",
        "append µs",
        "decode GPU",
        "kernel µs",
        "vs f16"
    );
    for r in &report.cache {
        println!(
            "{:<15} {:>7} {:<11} {:>9.1} {:>10.1} {:>11.1} {:>10.1} {:>7.2}x",
            r.shape,
            r.tokens,
            r.preset,
            r.step_us,
            r.append_us,
            r.step_decode_us,
            r.decode_us,
            r.speedup_vs_f16
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

/// One row of the CPU decode table.
#[derive(serde::Serialize)]
struct CpuRow {
    tokens: usize,
    preset: String,
    /// Median µs of one decode step.
    us: f64,
    /// Bytes the cache holds (every one is read by a step).
    bytes: u64,
    gb_per_s: f64,
    speedup_vs_f16: f64,
}

/// One row of the CPU quantize table.
#[derive(serde::Serialize)]
struct QuantRow {
    format: String,
    role: String,
    /// f32 input quantized per second on one thread.
    gb_per_s: f64,
}

/// Median µs of `reps` runs of `f`, after one warm-up run.
fn median_us(reps: usize, mut f: impl FnMut() -> Result<(), Error>) -> Result<f64, Error> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

/// Qwen2.5-VL-7B's layer (28 query heads, 4 KV heads, D 128), batch 1, every token visual:
/// one decode step on every thread rayon has, as the median of several; then quantize
/// throughput per format on one thread.
fn cpu(args: &Args) -> Result<(), Error> {
    use kvbits::kv::simd::{self, bench};
    let tokens = if args.tokens.is_empty() {
        bench::TOKENS.to_vec()
    } else {
        args.tokens.clone()
    };
    let (n_head, _, d) = bench::SHAPE;
    let mut rows = Vec::new();
    for &t in &tokens {
        let mut f16_us = None;
        for name in bench::CONFIGS {
            let (cache, q) = bench::decode_cache(name, t, 11)?;
            let mut out = vec![0f32; n_head * d];
            let reps = if t > 16384 { 11 } else { 31 };
            let us = median_us(reps, || {
                cache.attention_decode(0, &q, n_head, &mut out, bench::scale())
            })?;
            let bytes = cache.memory().total;
            let base = *f16_us.get_or_insert(us);
            rows.push(CpuRow {
                tokens: t,
                preset: name.to_string(),
                us,
                bytes,
                gb_per_s: bytes as f64 / (us * 1e-6) / 1e9,
                speedup_vs_f16: base / us,
            });
        }
    }
    let mut quant = Vec::new();
    let mut buf = Vec::new();
    for (f, role, x) in bench::quantize_inputs(12) {
        let us = median_us(5, || bench::quantize_blocks(f, role, &x, &mut buf))?;
        quant.push(QuantRow {
            format: f.name().to_string(),
            role: format!("{role:?}"),
            gb_per_s: (x.len() * 4) as f64 / (us * 1e-6) / 1e9,
        });
    }
    let threads = rayon::current_num_threads();
    let isa = simd::isa();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "device": "cpu",
                "isa": isa.name(),
                "threads": threads,
                "shape": "Qwen2.5-VL-7B layer (28/4 heads, D 128), batch 1",
                "decode": rows,
                "quantize": quant,
            })
        );
        return Ok(());
    }
    println!(
        "CPU, {isa} path, {threads} threads; Qwen2.5-VL-7B layer (28/4 heads, D 128), batch 1\n"
    );
    println!(
        "{:>7} {:<11} {:>9} {:>10} {:>7} {:>8}",
        "tokens", "preset", "µs", "MB read", "GB/s", "vs f16"
    );
    for r in &rows {
        println!(
            "{:>7} {:<11} {:>9.0} {:>10.1} {:>7.2} {:>7.2}x",
            r.tokens,
            r.preset,
            r.us,
            r.bytes as f64 / 1e6,
            r.gb_per_s,
            r.speedup_vs_f16
        );
    }
    println!(
        "\nquantize, one thread, blocks of {} tokens x D {d}: GB/s of f32 input",
        bench::QUANT_BLOCK
    );
    for r in &quant {
        println!("{:<11} {:<6} {:>6.2}", r.format, r.role, r.gb_per_s);
    }
    Ok(())
}
