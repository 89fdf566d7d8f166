//! GPU benchmarks of decode attention and quantize-on-append, shared by `kvbits bench --device
//! cuda` and `cargo bench --features cuda`. Times come from CUDA events (median of many
//! samples of steps enqueued back to back, after a warm-up; see `time_us`); caches smaller
//! than a few L2s are replicated and rotated so every launch reads DRAM, not L2. Every figure
//! is put next to the copy bandwidth measured in the same run and to our own f16 kernel on
//! the same shape.

use serde::Serialize;

use super::kernels::{self, BlockDesc, DecodePlan, DeviceRows, QuantBatch, QuantJob, WorkItem};
use super::runtime::{DeviceBuffer, Event, Stream, check};
use super::{DeviceCache, device_info, sys};
use crate::Error;
use crate::kv::{CacheConfig, FormatId, Modality, QuantParams, Role, Shape};

/// An attention layer shape: query heads, KV heads, head dim.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LayerShape {
    pub name: &'static str,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// The shapes of the targets.
pub const SHAPES: [LayerShape; 2] = [
    LayerShape {
        name: "Qwen2.5-VL-7B",
        n_head: 28,
        n_head_kv: 4,
        head_dim: 128,
    },
    LayerShape {
        name: "InternVL2.5-8B",
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
    },
];

/// A cache as the benchmark stores it: every token in the preset's visual formats (a
/// video-length context), calibrated spans where the preset calibrates.
#[derive(Clone, Copy, Debug)]
pub struct BenchPreset {
    pub name: &'static str,
    pub k: FormatId,
    pub v: FormatId,
    pub calibrate: bool,
}

pub const PRESETS: [BenchPreset; 5] = [
    BenchPreset {
        name: "f16",
        k: FormatId::F16,
        v: FormatId::F16,
        calibrate: false,
    },
    BenchPreset {
        name: "calibquant",
        k: FormatId::Q1Calib,
        v: FormatId::Q1Calib,
        calibrate: true,
    },
    BenchPreset {
        name: "vidkv",
        k: FormatId::K1_5Mix,
        v: FormatId::V1_58Tern,
        calibrate: false,
    },
    BenchPreset {
        name: "akvq",
        k: FormatId::Q2Had,
        v: FormatId::Q2Had,
        calibrate: false,
    },
    BenchPreset {
        name: "kivi2",
        k: FormatId::Kivi2,
        v: FormatId::Kivi2,
        calibrate: false,
    },
];

const BLOCK: usize = 128;
/// Tokens per calibrated span: eight 256-token frames.
const SPAN: usize = 2048;
/// Replicate a cache until the copies exceed this, so launches do not hit in L2.
const ROTATE_BYTES: usize = 256 << 20;
/// Decode steps (and quantize launches) timed back to back per sample (see `time_us`).
const STEPS_PER_SAMPLE: usize = 10;

#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    pub shape: &'static str,
    pub tokens: usize,
    pub batch: usize,
    pub preset: &'static str,
    pub us: f64,
    /// Bytes the step must read: every stored block of every sequence, and the queries.
    pub bytes: usize,
    pub gb_per_s: f64,
    /// Achieved bytes per second over the copy kernel's (read + write) bytes per second.
    pub pct_of_copy: f64,
    /// Our f16 kernel's time over this one, same shape, tokens and batch.
    pub speedup_vs_f16: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct QuantRow {
    pub shape: &'static str,
    pub tokens: usize,
    pub preset: &'static str,
    pub us: f64,
    /// f16 input read plus blocks written, K and V.
    pub bytes: usize,
    pub gb_per_s: f64,
    pub pct_of_copy: f64,
}

/// One token of a decode loop through [`DeviceCache`]: append its K and V, then attend.
#[derive(Clone, Debug, Serialize)]
pub struct CacheRow {
    pub shape: &'static str,
    pub tokens: usize,
    pub preset: &'static str,
    /// Host wall time of a synchronous append of one token plus decode, waited for.
    pub step_us: f64,
    /// The append's share of it.
    pub append_us: f64,
    /// GPU time of the step's decode (table upload and kernels), from CUDA events.
    pub step_decode_us: f64,
    /// GPU time of decode alone on an unchanged cache (its plan already uploaded).
    pub decode_us: f64,
    /// Our f16 cache's step time over this one.
    pub speedup_vs_f16: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub copy_gb_per_s: f64,
    pub decode: Vec<DecodeRow>,
    pub quantize: Vec<QuantRow>,
    pub cache: Vec<CacheRow>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median microseconds per launch of `launch(rep)`: `samples` times, `per_sample` launches
/// enqueued back to back between two events, after `warmup` launches. With one launch per
/// sample the figure includes the host's launch latency (the GPU idles until the launch
/// arrives); several back to back measure the GPU time of a step as a decode loop or a CUDA
/// graph enqueues it, the way llama.cpp's `test-backend-ops` times its kernels.
fn time_us(
    stream: &Stream,
    warmup: usize,
    samples: usize,
    per_sample: usize,
    mut launch: impl FnMut(usize) -> Result<(), Error>,
) -> Result<f64, Error> {
    for r in 0..warmup {
        launch(r)?;
    }
    stream.synchronize()?;
    let (start, end) = (Event::new()?, Event::new()?);
    let mut times = Vec::with_capacity(samples);
    let mut rep = warmup;
    for _ in 0..samples {
        start.record(stream)?;
        for _ in 0..per_sample {
            launch(rep)?;
            rep += 1;
        }
        end.record(stream)?;
        times.push(start.elapsed_ms(&end)? as f64 * 1e3 / per_sample as f64);
    }
    Ok(median(times))
}

/// Copy bandwidth: a 1 GiB device-to-device copy with our plain kernel, bytes read + written.
pub fn copy_bandwidth(stream: &Stream) -> Result<f64, Error> {
    let len = 1usize << 30;
    let (a, b) = (DeviceBuffer::new(len)?, DeviceBuffer::new(len)?);
    a.fill(1, stream)?;
    let us = time_us(stream, 3, 20, 1, |_| b.copy_from(&a, stream))?;
    Ok(2.0 * len as f64 / (us * 1e-6) / 1e9)
}

fn fill_kv(
    buf: &DeviceBuffer,
    n: usize,
    d: usize,
    seed: u64,
    stream: &Stream,
) -> Result<(), Error> {
    // SAFETY: `buf` holds at least n f16 values.
    check(
        unsafe { sys::kvb_cuda_fill_kv(buf.as_ptr(), n, d as i32, 8.0, seed, stream.raw()) },
        "fill kv",
    )
}

/// A quantized cache of `batch` sequences of `tokens` tokens on the device, its plan, and a
/// query: one decode step ready to launch.
pub struct DecodeBench {
    arenas: Vec<DeviceBuffer>,
    plan: DecodePlan,
    q: DeviceBuffer,
    out: DeviceBuffer,
    scale: f32,
    /// Bytes one step reads: the blocks of every sequence and the queries.
    pub bytes: usize,
}

impl DecodeBench {
    pub fn new(
        shape: LayerShape,
        tokens: usize,
        batch: usize,
        preset: BenchPreset,
        sms: usize,
        stream: &Stream,
    ) -> Result<DecodeBench, Error> {
        let q_len = batch * shape.n_head * shape.head_dim;
        // Calibrated caches with enough spans to give every SM a few CTAs get one item per
        // span, calibrated in one pass; the others are split as a DeviceCache splits them.
        let spans = tokens.div_ceil(SPAN);
        let pairs = batch * shape.n_head_kv;
        let item_blocks = if preset.calibrate && kernels::one_pass_pays(pairs * spans, sms) {
            SPAN / BLOCK
        } else {
            let formats = (1 << preset.k as u32) | (1 << preset.v as u32);
            let n_spans = if preset.calibrate { spans } else { 0 };
            let (d, n_head, h) = (shape.head_dim, shape.n_head, shape.n_head_kv);
            let fit = kernels::decode_fit(formats, d, n_head, h, n_spans)?;
            kernels::item_tokens(tokens, BLOCK, pairs, sms, fit) / BLOCK
        };
        let (arenas, plan, bytes) = build_cache(shape, tokens, batch, preset, item_blocks, stream)?;
        Ok(DecodeBench {
            arenas,
            plan,
            q: DeviceBuffer::from_slice(&crate::rng::Rng::new(7).normals(q_len), stream)?,
            out: DeviceBuffer::new(q_len * 4)?,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            bytes: bytes + q_len * 4,
        })
    }

    /// Launch step `rep` (asynchronous), on the `rep`-th copy of the cache in rotation.
    pub fn launch(&self, rep: usize, stream: &Stream) -> Result<(), Error> {
        let arena = &self.arenas[rep % self.arenas.len()];
        self.plan
            .launch(arena, &self.q, &self.out, self.scale, 3.0, stream)
    }
}

/// Quantize random K and V for every sequence and head in `preset`'s formats and lay out the
/// block table with work items of `item_blocks` blocks.
fn build_cache(
    shape: LayerShape,
    tokens: usize,
    batch: usize,
    preset: BenchPreset,
    item_blocks: usize,
    stream: &Stream,
) -> Result<(Vec<DeviceBuffer>, DecodePlan, usize), Error> {
    let (d, h) = (shape.head_dim, shape.n_head_kv);
    let params = QuantParams::default();
    let rows_per_seq = tokens * h * d;
    let (k_rows, v_rows) = (
        DeviceBuffer::new(2 * batch * rows_per_seq)?,
        DeviceBuffer::new(2 * batch * rows_per_seq)?,
    );
    fill_kv(&k_rows, batch * rows_per_seq, d, 1, stream)?;
    fill_kv(&v_rows, batch * rows_per_seq, d, 2, stream)?;
    let n_blocks = tokens.div_ceil(BLOCK);
    let block_n = |b: usize| BLOCK.min(tokens - b * BLOCK);
    let size = |f: FormatId, n, role| {
        f.imp()
            .block_size(Shape { n, d, role }, 0, &params)
            .total()
            .div_ceil(16)
            * 16
    };
    let (mut descs, mut k_jobs, mut v_jobs, mut work) = (vec![], vec![], vec![], vec![]);
    let mut offset = 0usize;
    for seq in 0..batch {
        for head in 0..h {
            let first = descs.len();
            for b in 0..n_blocks {
                let n = block_n(b);
                // Rows [seq][head][token][channel]: one head's tokens are contiguous.
                let row0 = (seq * h + head) * tokens * d + b * BLOCK * d;
                let (k_off, v_off) = (offset, offset + size(preset.k, n, Role::Key));
                offset = v_off + size(preset.v, n, Role::Value);
                k_jobs.push((row0, n, k_off));
                v_jobs.push((row0, n, v_off));
                let span = if preset.calibrate {
                    ((b * BLOCK) / SPAN) as i32
                } else {
                    -1
                };
                descs.push(BlockDesc {
                    k_offset: k_off as u64,
                    v_offset: v_off as u64,
                    n: n as i32,
                    k_format: preset.k as i32,
                    v_format: preset.v as i32,
                    span,
                });
            }
            for start in (0..n_blocks).step_by(item_blocks) {
                work.push(WorkItem {
                    seq: seq as i32,
                    kv_head: head as i32,
                    first_block: (first + start) as i32,
                    n_blocks: item_blocks.min(n_blocks - start) as i32,
                });
            }
        }
    }
    let arena = DeviceBuffer::new(offset)?;
    for (fmt, rows, jobs, role) in [
        (preset.k, &k_rows, &k_jobs, Role::Key),
        (preset.v, &v_rows, &v_jobs, Role::Value),
    ] {
        // One launch per chunk of jobs keeps the job table small.
        for chunk in jobs.chunks(1 << 16) {
            let qj: Vec<QuantJob> = chunk
                .iter()
                .map(|&(row0, n, out)| QuantJob {
                    rows: DeviceRows {
                        buf: rows,
                        f16: true,
                        offset: row0,
                        stride: d,
                    },
                    n,
                    role,
                    protect: None,
                    out_offset: out,
                })
                .collect();
            kernels::quantize(fmt, d, &qj, &params, &arena, stream)?;
        }
    }
    let copies = ROTATE_BYTES.div_ceil(offset).clamp(1, 64);
    let mut arenas = vec![arena];
    for _ in 1..copies {
        let c = DeviceBuffer::new(offset)?;
        c.copy_from(&arenas[0], stream)?;
        arenas.push(c);
    }
    let n_spans = if preset.calibrate {
        tokens.div_ceil(SPAN)
    } else {
        0
    };
    let plan = DecodePlan::new(&descs, &work, batch, shape.n_head, h, d, n_spans, stream)?;
    stream.synchronize()?;
    Ok((arenas, plan, offset))
}

/// Whether `preset` runs: f16 always (the baseline), the others when `only` is empty or names
/// them, where the device supports their formats.
fn selected(preset: &BenchPreset, only: &[String]) -> bool {
    (preset.name == "f16" || only.is_empty() || only.iter().any(|o| o == preset.name))
        && kernels::supports(preset.k)
        && kernels::supports(preset.v)
}

/// Time one decode step for every selected preset, f16 first.
pub fn decode_rows(
    shape: LayerShape,
    tokens: usize,
    batch: usize,
    copy_gbps: f64,
    sms: usize,
    only: &[String],
    stream: &Stream,
) -> Result<Vec<DecodeRow>, Error> {
    let mut rows: Vec<DecodeRow> = Vec::new();
    for preset in PRESETS.iter().filter(|p| selected(p, only)) {
        let bench = DecodeBench::new(shape, tokens, batch, *preset, sms, stream)?;
        let us = time_us(stream, 5, 50, STEPS_PER_SAMPLE, |r| bench.launch(r, stream))?;
        let gbps = bench.bytes as f64 / (us * 1e-6) / 1e9;
        let f16_us = rows.first().map_or(us, |f| f.us);
        rows.push(DecodeRow {
            shape: shape.name,
            tokens,
            batch,
            preset: preset.name,
            us,
            bytes: bench.bytes,
            gb_per_s: gbps,
            pct_of_copy: 100.0 * gbps / copy_gbps,
            speedup_vs_f16: f16_us / us,
        });
    }
    Ok(rows)
}

/// Quantize-on-append of one `tokens`-token visual span of one layer (all KV heads, K and V).
pub fn quantize_rows(
    shape: LayerShape,
    tokens: usize,
    copy_gbps: f64,
    only: &[String],
    stream: &Stream,
) -> Result<Vec<QuantRow>, Error> {
    let (d, h) = (shape.head_dim, shape.n_head_kv);
    let params = QuantParams::default();
    let rows_len = tokens * h * d;
    let input = DeviceBuffer::new(2 * rows_len)?;
    fill_kv(&input, rows_len, d, 3, stream)?;
    let mut out = Vec::new();
    for preset in PRESETS
        .iter()
        .filter(|p| p.name != "f16" && selected(p, only))
    {
        let mut jobs = Vec::new();
        let mut written = 0usize;
        for (fmt, role) in [(preset.k, Role::Key), (preset.v, Role::Value)] {
            for head in 0..h {
                for b in 0..tokens.div_ceil(BLOCK) {
                    let n = BLOCK.min(tokens - b * BLOCK);
                    jobs.push((fmt, role, (head * tokens + b * BLOCK) * d, n, written));
                    written += fmt
                        .imp()
                        .block_size(Shape { n, d, role }, 0, &params)
                        .total()
                        .div_ceil(16)
                        * 16;
                }
            }
        }
        let arena = DeviceBuffer::new(written)?;
        // One launch per format: K and V go together where they share one.
        let mut formats = vec![preset.k];
        if preset.v != preset.k {
            formats.push(preset.v);
        }
        let batches = formats
            .into_iter()
            .map(|fmt| {
                let qj: Vec<QuantJob> = jobs
                    .iter()
                    .filter(|j| j.0 == fmt)
                    .map(|&(_, role, row0, n, off)| QuantJob {
                        rows: DeviceRows {
                            buf: &input,
                            f16: true,
                            offset: row0,
                            stride: d,
                        },
                        n,
                        role,
                        protect: None,
                        out_offset: off,
                    })
                    .collect();
                QuantBatch::new(fmt, d, &qj, &params, &arena, stream)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let launch = |_| batches.iter().try_for_each(|b| b.launch(&arena, stream));
        let us = time_us(stream, 2, 20, STEPS_PER_SAMPLE, launch)?;
        let bytes = 2 * 2 * rows_len + written;
        let gbps = bytes as f64 / (us * 1e-6) / 1e9;
        out.push(QuantRow {
            shape: shape.name,
            tokens,
            preset: preset.name,
            us,
            bytes,
            gb_per_s: gbps,
            pct_of_copy: 100.0 * gbps / copy_gbps,
        });
    }
    Ok(out)
}

/// The whole benchmark: copy bandwidth, decode at every size and batch, quantize-append; for
/// the presets named in `only` (and f16), or all when it is empty.
pub fn run(tokens: &[usize], batches: &[usize], only: &[String]) -> Result<Report, Error> {
    let stream = Stream::new()?;
    let (device, sms, _) = device_info(0)?;
    let copy = copy_bandwidth(&stream)?;
    let mut decode = Vec::new();
    for shape in SHAPES {
        for &batch in batches {
            for &t in tokens {
                decode.extend(decode_rows(shape, t, batch, copy, sms, only, &stream)?);
            }
        }
    }
    let mut quantize = Vec::new();
    for shape in SHAPES {
        quantize.extend(quantize_rows(shape, 4096, copy, only, &stream)?);
    }
    let mut cache = Vec::new();
    for &t in tokens {
        cache.extend(cache_rows(SHAPES[0], t, &stream)?);
    }
    Ok(Report {
        device,
        copy_gb_per_s: copy,
        decode,
        quantize,
        cache,
    })
}

/// Text tokens before the visual ones in the decode-loop caches: the prompt of a real
/// multimodal cache, held in each preset's text formats (q4_had for akvq, f16 for calibquant).
pub const PROMPT: usize = 256;

/// Decode-loop steps through a one-layer [`DeviceCache`] of a [`PROMPT`]-token text prompt and
/// `tokens` visual tokens (appended in 2048-token spans, calibrated where the preset
/// calibrates), for our f16 cache and every preset: what a runtime pays per token, host round
/// trips and plan uploads included.
pub fn cache_rows(
    shape: LayerShape,
    tokens: usize,
    stream: &Stream,
) -> Result<Vec<CacheRow>, Error> {
    let (d, h) = (shape.head_dim, shape.n_head_kv);
    let span = SPAN.min(tokens);
    let rows = DeviceBuffer::new(2 * span * h * d)?;
    fill_kv(&rows, span * h * d, d, 5, stream)?;
    let q = DeviceBuffer::from_slice(&crate::rng::Rng::new(9).normals(shape.n_head * d), stream)?;
    let out = DeviceBuffer::new(shape.n_head * d * 4)?;
    let scale = 1.0 / (d as f32).sqrt();
    let configs = std::iter::once((
        "f16",
        CacheConfig::pair(FormatId::F16, FormatId::F16, 1, h, d),
    ))
    .chain(
        CacheConfig::PRESETS
            .iter()
            .map(|&p| (p, CacheConfig::preset(p, 1, h, d).expect("preset"))),
    );
    let mut out_rows: Vec<CacheRow> = Vec::new();
    for (name, cfg) in configs {
        if ![cfg.k_text, cfg.v_text, cfg.k_visual, cfg.v_visual]
            .into_iter()
            .all(kernels::supports)
        {
            continue;
        }
        let mut cache = DeviceCache::new(cfg, 0)?;
        let prompt = PROMPT.min(span);
        cache.append(0, &rows, &rows, true, prompt, Modality::Text, None, stream)?;
        for start in (0..tokens).step_by(span) {
            let n = span.min(tokens - start);
            cache.append(0, &rows, &rows, true, n, Modality::Visual, None, stream)?;
        }
        let decode_us = time_us(stream, 3, 30, 1, |_| {
            cache.attention_decode(0, &q, &out, shape.n_head, scale, stream)
        })?;
        let (mut steps, mut appends, mut gpu) = (Vec::new(), Vec::new(), Vec::new());
        let (start, end) = (Event::new()?, Event::new()?);
        for i in 0..45 {
            let t0 = std::time::Instant::now();
            cache.append(0, &rows, &rows, true, 1, Modality::Text, None, stream)?;
            let appended = t0.elapsed();
            start.record(stream)?;
            cache.attention_decode(0, &q, &out, shape.n_head, scale, stream)?;
            end.record(stream)?;
            stream.synchronize()?;
            if i >= 5 {
                steps.push(t0.elapsed().as_secs_f64() * 1e6);
                appends.push(appended.as_secs_f64() * 1e6);
                gpu.push(start.elapsed_ms(&end)? as f64 * 1e3);
            }
        }
        let step_us = median(steps);
        let f16_us = out_rows.first().map_or(step_us, |f| f.step_us);
        out_rows.push(CacheRow {
            shape: shape.name,
            tokens,
            preset: name,
            step_us,
            append_us: median(appends),
            step_decode_us: median(gpu),
            decode_us,
            speedup_vs_f16: f16_us / step_us,
        });
    }
    Ok(out_rows)
}
