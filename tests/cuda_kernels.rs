//! CUDA kernels against the CPU reference, for every format the device table implements, every
//! head dim, partial and multi-block spans, several sequences. Skipped (with a message) where
//! there is no GPU. Inputs are fresh random values (seed printed); outputs are poisoned first.
#![cfg(feature = "cuda")]

mod common;

use common::gpu;

use half::f16;
use kvbits::cuda::kernels::{self, BlockDesc, DecodePlan, DeviceRows, QuantJob, WorkItem};
use kvbits::cuda::{DeviceBuffer, Stream};
use kvbits::kv::{Applies, FormatId, HEAD_DIMS, QuantParams, Role, Shape};
use kvbits::rng::{Rng, rel_err};

/// Keys with a few channels 5-20x larger, rounded through f16 as the cache stores them.
fn kv_like(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let big: Vec<f32> = (0..d)
        .map(|c| {
            if c % 17 == 3 {
                5.0 + 15.0 * rng.uniform()
            } else {
                1.0
            }
        })
        .collect();
    (0..n * d)
        .map(|i| f16::from_f32(rng.normal() * big[i % d]).to_f32())
        .collect()
}

/// Formats the kernels implement; `KVBITS_GPU_FORMATS=f16,q8_0` narrows them (to isolate a
/// format whose kernel faults, as a CUDA fault ends every later launch of the process).
fn device_formats() -> Vec<FormatId> {
    let only = std::env::var("KVBITS_GPU_FORMATS").ok();
    let fs: Vec<FormatId> = FormatId::ALL
        .into_iter()
        .filter(|&f| kernels::supports(f))
        .filter(|f| {
            only.as_ref()
                .is_none_or(|o| o.split(',').any(|n| n == f.info().name))
        })
        .collect();
    eprintln!("formats on the device: {fs:?}");
    fs
}

fn align16(v: usize) -> usize {
    v.div_ceil(16) * 16
}

#[test]
fn copy_kernel_copies_every_byte() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed("copy_kernel_copies_every_byte"));
    for len in [16usize, 1000, 1 << 20, (1 << 20) + 7] {
        let src: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let a = DeviceBuffer::from_slice(&src, &stream).unwrap();
        let b = DeviceBuffer::new(len).unwrap();
        b.fill(0xAB, &stream).unwrap();
        b.copy_from(&a, &stream).unwrap();
        let mut back = vec![0u8; len];
        b.download(&mut back, 0, &stream).unwrap();
        assert_eq!(back, src, "len {len}");
    }
}

/// GPU codes equal the CPU reference byte for byte, from f16 and from f32 rows; GPU
/// dequantize equals CPU dequantize.
#[test]
fn quantize_and_dequantize_match_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed("quantize_and_dequantize_match_the_cpu"));
    let params = QuantParams::default();
    let mut failures = Vec::new();
    for f in device_formats() {
        for d in HEAD_DIMS {
            for &role in f.info().applies.roles() {
                let ns = [1usize, 7, 128, 300];
                let xs: Vec<Vec<f32>> = ns.iter().map(|&n| kv_like(&mut rng, n, d)).collect();
                let mut cpu = Vec::new();
                let mut offsets = Vec::new();
                for (x, &n) in xs.iter().zip(&ns) {
                    let shape = Shape { n, d, role };
                    let mut blk = Vec::new();
                    f.imp().quantize(x, shape, &[], &params, &mut blk).unwrap();
                    offsets.push(align16(cpu.len()));
                    cpu.resize(align16(cpu.len()), 0);
                    cpu.extend_from_slice(&blk);
                }
                let all: Vec<f32> = xs.concat();
                let all16: Vec<f16> = all.iter().map(|&v| f16::from_f32(v)).collect();
                // Rows 16-byte aligned (vector loads) and shifted by one value (scalar path).
                for (as_f16, shift) in [(true, 0), (false, 0), (true, 1), (false, 1)] {
                    let rows = if as_f16 {
                        let mut v = vec![f16::ZERO; shift];
                        v.extend_from_slice(&all16);
                        DeviceBuffer::from_slice(&v, &stream).unwrap()
                    } else {
                        let mut v = vec![0f32; shift];
                        v.extend_from_slice(&all);
                        DeviceBuffer::from_slice(&v, &stream).unwrap()
                    };
                    let arena = DeviceBuffer::new(cpu.len()).unwrap();
                    arena.fill(0, &stream).unwrap();
                    let mut first = 0;
                    let jobs: Vec<QuantJob> = ns
                        .iter()
                        .zip(&offsets)
                        .map(|(&n, &off)| {
                            let j = QuantJob {
                                rows: DeviceRows {
                                    buf: &rows,
                                    f16: as_f16,
                                    offset: shift + first * d,
                                    stride: d,
                                },
                                n,
                                role,
                                protect: None,
                                out_offset: off,
                            };
                            first += n;
                            j
                        })
                        .collect();
                    kernels::quantize(f, d, &jobs, &params, &arena, &stream).unwrap();
                    let mut gpu_bytes = vec![0u8; cpu.len()];
                    arena.download(&mut gpu_bytes, 0, &stream).unwrap();
                    for (i, (&n, &off)) in ns.iter().zip(&offsets).enumerate() {
                        let len = f.imp().block_size(Shape { n, d, role }, 0, &params).total();
                        let (g, c) = (&gpu_bytes[off..off + len], &cpu[off..off + len]);
                        if g != c && f == FormatId::K1_5Mix {
                            match k1_5_mix_tolerated(&xs[i], n, d, g, c) {
                                Ok(k) => {
                                    eprintln!(
                                        "{f} d={d} n={n}: {k} rounding-tolerated differences"
                                    );
                                    continue;
                                }
                                Err(e) => {
                                    failures.push(format!("{f} d={d} n={n} block {i}: {e}"));
                                    continue;
                                }
                            }
                        }
                        if g != c {
                            let at = (0..len).find(|&j| g[j] != c[j]).unwrap_or(0);
                            let differ = (0..len).filter(|&j| g[j] != c[j]).count();
                            let x0: Vec<f32> = xs[i][..4].to_vec();
                            let mut back = vec![f16::ZERO; 4];
                            if as_f16 {
                                let first: usize = ns[..i].iter().sum();
                                rows.download(&mut back, 2 * (shift + first * d), &stream)
                                    .unwrap();
                            }
                            failures.push(format!(
                                "{f} d={d} {role:?} n={n} block {i} from {} (shift {shift}): {differ} of {len} \
                                 bytes differ, first at {at}: gpu {:?} cpu {:?}; x {x0:?}, \
                                 rows on the device {back:?}",
                                if as_f16 { "f16" } else { "f32" },
                                &g[at..(at + 8).min(len)],
                                &c[at..(at + 8).min(len)]
                            ));
                        }
                    }
                }
                // Dequantize the CPU's blocks on the GPU into a poisoned buffer.
                let arena = DeviceBuffer::from_slice(&cpu, &stream).unwrap();
                let total: usize = ns.iter().sum();
                let out = DeviceBuffer::new(total * d * 2).unwrap();
                out.fill(0xFF, &stream).unwrap();
                let mut first = 0;
                let jobs: Vec<_> = ns
                    .iter()
                    .zip(&offsets)
                    .map(|(&n, &off)| {
                        let j = (off, n, role, first * d, d);
                        first += n;
                        j
                    })
                    .collect();
                kernels::dequantize(f, d, &jobs, &arena, &out, &stream).unwrap();
                let mut got = vec![f16::ZERO; total * d];
                out.download(&mut got, 0, &stream).unwrap();
                let mut first = 0;
                for (&n, &off) in ns.iter().zip(&offsets) {
                    let shape = Shape { n, d, role };
                    let mut want = vec![0f32; n * d];
                    let len = f.imp().block_size(shape, 0, &params).total();
                    f.imp().dequantize(&cpu[off..off + len], shape, &mut want);
                    let block = &cpu[off..off + len];
                    for (i, &w) in want.iter().enumerate() {
                        let g = got[first * d + i];
                        if g.is_nan() {
                            failures.push(format!("{f} d={d} n={n}: element {i} not written"));
                            break;
                        }
                        if g == f16::from_f32(w) {
                            continue;
                        }
                        if f == FormatId::K1_5Mix && k1_5_mix_value_tolerated(block, d, i % d, w, g)
                        {
                            eprintln!("{f} d={d} n={n} element {i}: tolerated gpu {g} cpu {w}");
                            continue;
                        }
                        failures.push(format!(
                            "{f} d={d} {role:?} n={n} dequantized element {i}: gpu {g} cpu {w}"
                        ));
                        break;
                    }
                    first += n;
                }
            }
        }
    }
    for f in &failures {
        eprintln!("{f}");
    }
    assert!(
        failures.is_empty(),
        "{} blocks differ from the CPU's bytes",
        failures.len()
    );
}

/// The f16 at byte `at` of a block.
fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

/// Many blocks in one launch, as a long span quantizes: launchers that size CTAs by the job
/// count (k1_5_mix's CTA shrinks from 512 threads where one CTA per multiprocessor would leave
/// blocks for a second wave) must write the same bytes at every size.
#[test]
fn quantize_of_many_blocks_matches_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed("quantize_of_many_blocks_matches_the_cpu"));
    let params = QuantParams::default();
    let mut failures = Vec::new();
    for f in device_formats() {
        for d in [128, 256] {
            for &role in f.info().applies.roles() {
                for n_jobs in [200, 600] {
                    let n = 33;
                    let x = kv_like(&mut rng, n * n_jobs, d);
                    let len = f.imp().block_size(Shape { n, d, role }, 0, &params).total();
                    let at = align16(len);
                    let mut cpu = vec![0u8; at * n_jobs];
                    for (b, xb) in x.chunks_exact(n * d).enumerate() {
                        let mut blk = Vec::new();
                        f.imp()
                            .quantize(xb, Shape { n, d, role }, &[], &params, &mut blk)
                            .unwrap();
                        cpu[b * at..b * at + len].copy_from_slice(&blk);
                    }
                    let rows = DeviceBuffer::from_slice(&x, &stream).unwrap();
                    let arena = DeviceBuffer::new(cpu.len()).unwrap();
                    arena.fill(0, &stream).unwrap();
                    let jobs: Vec<QuantJob> = (0..n_jobs)
                        .map(|b| QuantJob {
                            rows: DeviceRows {
                                buf: &rows,
                                f16: false,
                                offset: b * n * d,
                                stride: d,
                            },
                            n,
                            role,
                            protect: None,
                            out_offset: b * at,
                        })
                        .collect();
                    kernels::quantize(f, d, &jobs, &params, &arena, &stream).unwrap();
                    let mut gpu_bytes = vec![0u8; cpu.len()];
                    arena.download(&mut gpu_bytes, 0, &stream).unwrap();
                    for b in 0..n_jobs {
                        let (g, c) = (&gpu_bytes[b * at..][..len], &cpu[b * at..][..len]);
                        let xb = &x[b * n * d..(b + 1) * n * d];
                        let ok = g == c
                            || (f == FormatId::K1_5Mix
                                && k1_5_mix_tolerated(xb, n, d, g, c).is_ok());
                        if !ok {
                            failures.push(format!(
                                "{f} d={d} {role:?}, {n_jobs} jobs: block {b} differs"
                            ));
                            break;
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// k1_5_mix's rFFT rounding on the GPU differs from realfft's (csrc/k1_5_mix.cu says why).
/// Both are within `4·Dl·ε·Σ|z|` of the exact coefficients, so the GPU may differ only in
/// - a sign bit whose CPU coefficient lies within that bound of 0;
/// - a scale, to the adjacent f16, whose CPU mean lies within an f32 ulp plus that bound of
///   the midpoint between the two (the CPU rounds the mean f64 -> f32 -> f16).
///
/// Everything else (mask, ranges, 2-bit codes) must be equal. The CPU's coefficients are
/// recomputed as src/kv/formats/k1_5_mix.rs computes them. Returns the tolerated count.
fn k1_5_mix_tolerated(
    x: &[f32],
    n: usize,
    d: usize,
    gpu: &[u8],
    cpu: &[u8],
) -> Result<usize, String> {
    let mask = &cpu[..d / 8];
    if gpu[..d / 8] != *mask {
        return Err(format!(
            "channel masks differ: gpu {:?} cpu {mask:?}",
            &gpu[..d / 8]
        ));
    }
    let high = |c: usize| (mask[c / 8] >> (c % 8)) & 1 == 1;
    let lo: Vec<usize> = (0..d).filter(|&c| !high(c)).collect();
    let (dh, dl) = (d - lo.len(), lo.len());
    let (scales, codes, stride) = (d / 8 + 4 * dh, d / 8 + 4 * dh + 2 * dl, dh / 4 + dl / 8);
    if gpu[d / 8..scales] != cpu[d / 8..scales] {
        return Err("2-bit channel ranges differ".into());
    }
    let plan = realfft::RealFftPlanner::<f64>::new().plan_fft_forward(dl);
    let mut coef = vec![0f64; n * dl];
    let mut bound = vec![0f64; n];
    for t in 0..n {
        let mut z: Vec<f64> = lo.iter().map(|&c| x[t * d + c] as f64).collect();
        bound[t] = 4.0 * dl as f64 * f64::EPSILON * z.iter().map(|v| v.abs()).sum::<f64>();
        let mut bins = plan.make_output_vec();
        plan.process(&mut z, &mut bins).unwrap();
        let row = &mut coef[t * dl..(t + 1) * dl];
        row[0] = bins[0].re;
        row[1] = bins[dl / 2].re;
        for k in 1..dl / 2 {
            row[2 * k] = bins[k].re;
            row[2 * k + 1] = bins[k].im;
        }
    }
    let max_bound = bound.iter().fold(0f64, |a, &b| a.max(b));
    let mut tolerated = 0;
    for k in 0..dl {
        let (g, c) = (f16_at(gpu, scales + 2 * k), f16_at(cpu, scales + 2 * k));
        if g.to_bits() == c.to_bits() {
            continue;
        }
        let mean = (0..n).map(|t| coef[t * dl + k].abs()).sum::<f64>() / n as f64;
        let mid = (g.to_f64() + c.to_f64()) / 2.0;
        let slack = mid.abs() * f32::EPSILON as f64 + max_bound;
        if g.to_bits().abs_diff(c.to_bits()) != 1 || (mean - mid).abs() > slack {
            return Err(format!(
                "scale {k}: gpu {g} cpu {c}, CPU mean {mean} is not within {slack} of {mid}"
            ));
        }
        tolerated += 1;
    }
    for t in 0..n {
        let (g, c) = (
            &gpu[codes + t * stride..][..stride],
            &cpu[codes + t * stride..][..stride],
        );
        if g[..dh / 4] != c[..dh / 4] {
            return Err(format!("token {t}: 2-bit codes differ"));
        }
        for k in 0..dl {
            let bit = |r: &[u8]| (r[dh / 4 + k / 8] >> (k % 8)) & 1;
            if bit(g) != bit(c) {
                let v = coef[t * dl + k];
                if v.abs() > bound[t] {
                    return Err(format!(
                        "token {t} coefficient {k}: sign bits differ at {v} (tolerated within {})",
                        bound[t]
                    ));
                }
                tolerated += 1;
            }
        }
    }
    Ok(tolerated)
}

/// A k1_5_mix value the GPU decodes to the f16 next to the CPU's: only a low-range channel
/// (an inverse DFT) whose CPU value `w` lies within an f32 ulp plus the transforms' rounding
/// (`4·Dl·ε` of `2·Σ scale / Dl`, a bound on the sum's terms) of the midpoint between the two.
fn k1_5_mix_value_tolerated(block: &[u8], d: usize, c: usize, w: f32, g: f16) -> bool {
    let want = f16::from_f32(w);
    if (block[c / 8] >> (c % 8)) & 1 == 1 || g.to_bits().abs_diff(want.to_bits()) != 1 {
        return false;
    }
    let dh: usize = block[..d / 8].iter().map(|b| b.count_ones() as usize).sum();
    let dl = d - dh;
    let scales: f64 = (0..dl)
        .map(|k| f16_at(block, d / 8 + 4 * dh + 2 * k).to_f64())
        .sum();
    let bound = 4.0 * dl as f64 * f64::EPSILON * 2.0 * scales / dl as f64;
    let mid = (g.to_f64() + want.to_f64()) / 2.0;
    (w as f64 - mid).abs() <= mid.abs() * f32::EPSILON as f64 + bound
}

/// One block of K and V of one KV head, quantized on the CPU.
struct CpuBlock {
    kf: FormatId,
    vf: FormatId,
    kb: Vec<u8>,
    vb: Vec<u8>,
    n: usize,
    span: i32,
}

impl CpuBlock {
    /// Random keys and values of `n` tokens quantized on the CPU with `protect` (keys too
    /// where their format protects tokens).
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut Rng,
        kf: FormatId,
        vf: FormatId,
        n: usize,
        d: usize,
        span: i32,
        protect: &[bool],
        params: &QuantParams,
    ) -> CpuBlock {
        let mut quantize = |f: FormatId, role, protect: &[bool]| {
            let mut b = Vec::new();
            let x = kv_like(&mut *rng, n, d);
            f.imp()
                .quantize(&x, Shape { n, d, role }, protect, params, &mut b)
                .unwrap();
            b
        };
        let kb = quantize(
            kf,
            Role::Key,
            if kf.imp().protects() { protect } else { &[] },
        );
        let vb = quantize(vf, Role::Value, protect);
        CpuBlock {
            kf,
            vf,
            kb,
            vb,
            n,
            span,
        }
    }
}

/// One sequence's blocks of one KV head.
struct HeadBlocks {
    blocks: Vec<CpuBlock>,
}

impl HeadBlocks {
    /// Append `b` to the arena (K and V 16-byte aligned) and the block table.
    fn push(&mut self, b: CpuBlock, arena: &mut Vec<u8>, descs: &mut Vec<BlockDesc>) {
        arena.resize(align16(arena.len()), 0);
        let k_offset = arena.len() as u64;
        arena.extend_from_slice(&b.kb);
        arena.resize(align16(arena.len()), 0);
        let v_offset = arena.len() as u64;
        arena.extend_from_slice(&b.vb);
        descs.push(BlockDesc {
            k_offset,
            v_offset,
            n: b.n as i32,
            k_format: b.kf as i32,
            v_format: b.vf as i32,
            span: b.span,
        });
        self.blocks.push(b);
    }
}

/// CPU reference: softmax over all blocks' post-scaled scores (calibrated per span) of
/// one query head, then Σ p·v̂.
fn cpu_attention(h: &HeadBlocks, q: &[f32], d: usize, scale: f32, delta: f32) -> Vec<f32> {
    let mut logits: Vec<Vec<f32>> = h
        .blocks
        .iter()
        .map(|b| {
            let mut s = vec![0f32; b.n];
            let shape = Shape {
                n: b.n,
                d,
                role: Role::Key,
            };
            b.kf.imp().scores(&b.kb, shape, q, &mut s);
            s.iter().map(|v| v * scale).collect()
        })
        .collect();
    let mut spans: Vec<i32> = h
        .blocks
        .iter()
        .map(|b| b.span)
        .filter(|&s| s >= 0)
        .collect();
    spans.dedup();
    for span in spans {
        let members: Vec<usize> = (0..h.blocks.len())
            .filter(|&i| h.blocks[i].span == span)
            .collect();
        let all: Vec<f32> = members.iter().flat_map(|&i| logits[i].clone()).collect();
        let (lo, hi) = all
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if hi - lo > delta {
            for &i in &members {
                for v in &mut logits[i] {
                    *v = lo + (*v - lo) * (hi - lo - delta) / (hi - lo);
                }
            }
        }
    }
    let max = logits
        .iter()
        .flatten()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum: f64 = logits
        .iter()
        .flatten()
        .map(|&v| ((v - max) as f64).exp())
        .sum();
    let mut out = vec![0f32; d];
    for (b, l) in h.blocks.iter().zip(&logits) {
        let p: Vec<f32> = l
            .iter()
            .map(|&v| (((v - max) as f64).exp() / sum) as f32)
            .collect();
        let shape = Shape {
            n: b.n,
            d,
            role: Role::Value,
        };
        b.vf.imp().accumulate(&b.vb, shape, &p, &mut out);
    }
    out
}

/// [`cpu_attention`] for every sequence and query head: `q` and the result are
/// `[n_seq][n_head][d]`, `heads` is `[n_seq][n_head_kv]`.
fn cpu_outputs(
    heads: &[HeadBlocks],
    q: &[f32],
    n_head: usize,
    n_head_kv: usize,
    d: usize,
    scale: f32,
    delta: f32,
) -> Vec<f32> {
    let g = n_head / n_head_kv;
    let mut want = vec![0f32; q.len()];
    for (i, out) in want.chunks_exact_mut(d).enumerate() {
        let (seq, h) = (i / n_head, i % n_head);
        let r = cpu_attention(
            &heads[seq * n_head_kv + h / g],
            &q[i * d..][..d],
            d,
            scale,
            delta,
        );
        out.copy_from_slice(&r);
    }
    want
}

/// Whether the tiled tensor-core kernels take a cache of f16 blocks and `kf`/`vf` blocks:
/// kivi2, the AKVQ formats (q2_had and q4_had, mixed or not), or VidKV's (k1_5_mix keys,
/// v1_58_tern values: decode_prepared.cuh).
fn tiled_pair(kf: FormatId, vf: FormatId) -> bool {
    use FormatId::*;
    [&[Kivi2][..], &[Q2Had, Q4Had], &[K1_5Mix, V1_58Tern]]
        .iter()
        .any(|family| [kf, vf].iter().all(|f| *f == F16 || family.contains(f)))
}

/// Work items of sequence 0, KV head `kv`: (first block, blocks) pairs, relative to the head's
/// first block at `first` in the table.
fn push_items(work: &mut Vec<WorkItem>, kv: usize, first: usize, items: &[(usize, usize)]) {
    work.extend(items.iter().map(|&(b, len)| WorkItem {
        seq: 0,
        kv_head: kv as i32,
        first_block: (first + b) as i32,
        n_blocks: len as i32,
    }));
}

/// Launch `plan` into a poisoned output and compare with `want`: the relative error (printed
/// with `what`), or a message naming `what` where an element is unwritten or not finite or
/// the error is 1e-3 or more.
#[allow(clippy::too_many_arguments)]
fn launch_against(
    plan: &DecodePlan,
    arena: &DeviceBuffer,
    q: &DeviceBuffer,
    want: &[f32],
    scale: f32,
    delta: f32,
    what: &str,
    stream: &Stream,
) -> Result<f64, String> {
    let out = DeviceBuffer::new(want.len() * 4).unwrap();
    out.fill(0xFF, stream).unwrap();
    plan.launch(arena, q, &out, scale, delta, stream).unwrap();
    let mut got = vec![0f32; want.len()];
    out.download(&mut got, 0, stream).unwrap();
    let e = rel_err(&got, want);
    if !got.iter().all(|v| v.is_finite()) {
        return Err(format!("{what}: unwritten or non-finite output"));
    }
    if e.is_nan() || e >= 1e-3 {
        return Err(format!("{what}: rel err {e}"));
    }
    eprintln!("{what}: rel err {e:.2e}");
    Ok(e)
}

/// GPU decode attention equals the CPU reference on the same quantized blocks (rel. < 1e-3):
/// every K/V pair of formats on the device, GQA 7:1 and 4:1, spans longer than one block,
/// partial blocks, calibration on q1_calib spans, two sequences, several work items per head.
#[test]
fn decode_attention_matches_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed("decode_attention_matches_the_cpu"));
    let params = QuantParams::default();
    let fs = device_formats();
    let keys: Vec<FormatId> = fs
        .iter()
        .copied()
        .filter(|f| f.info().applies != Applies::Values)
        .collect();
    let values: Vec<FormatId> = fs
        .iter()
        .copied()
        .filter(|f| f.info().applies != Applies::Keys)
        .collect();
    let (scale_of, delta) = (|d: usize| 1.0 / (d as f32).sqrt(), 3.0f32);
    let mut failures = Vec::new();
    for d in HEAD_DIMS {
        for &(n_head, n_head_kv) in &[(28usize, 4usize), (8, 2)] {
            for &kf in &keys {
                for &vf in &values {
                    let n_seq = 2;
                    let mut arena = Vec::new();
                    let mut descs = Vec::new();
                    let mut work = Vec::new();
                    let mut heads = Vec::new();
                    let mut n_spans = 0;
                    for seq in 0..n_seq {
                        // A text run (f16), a calibrated visual span of 3 blocks (last partial), a tail.
                        let plan = [
                            (FormatId::F16, FormatId::F16, 37, -1),
                            (kf, vf, 128, 0),
                            (kf, vf, 128, 0),
                            (kf, vf, 61, 0),
                            (kf, vf, 5, -1),
                        ];
                        n_spans = usize::from(kf == FormatId::Q1Calib);
                        for kv in 0..n_head_kv {
                            let mut hb = HeadBlocks { blocks: vec![] };
                            let first_block = descs.len();
                            for &(k_fmt, v_fmt, n, span) in &plan {
                                let span = if span >= 0 && kf == FormatId::Q1Calib {
                                    span
                                } else {
                                    -1
                                };
                                let b = CpuBlock::random(
                                    &mut rng,
                                    k_fmt,
                                    v_fmt,
                                    n,
                                    d,
                                    span,
                                    &[],
                                    &params,
                                );
                                hb.push(b, &mut arena, &mut descs);
                            }
                            // Split the head's blocks into work items of 1-2 blocks, or
                            // (head 0) one item of all, so a warp's next block is prefetched.
                            let mut b = 0;
                            while b < plan.len() {
                                let len = if kv == 0 {
                                    plan.len()
                                } else if b % 2 == 0 {
                                    2.min(plan.len() - b)
                                } else {
                                    1
                                };
                                work.push(WorkItem {
                                    seq,
                                    kv_head: kv as i32,
                                    first_block: (first_block + b) as i32,
                                    n_blocks: len as i32,
                                });
                                b += len;
                            }
                            heads.push(hb);
                        }
                    }
                    let q: Vec<f32> = rng.normals(n_seq as usize * n_head * d);
                    let mut plan = DecodePlan::new(
                        &descs,
                        &work,
                        n_seq as usize,
                        n_head,
                        n_head_kv,
                        d,
                        n_spans,
                        &stream,
                    )
                    .unwrap();
                    let want = cpu_outputs(&heads, &q, n_head, n_head_kv, d, scale_of(d), delta);
                    // Both kernel paths where a tensor-core one applies (D <= 128): f16 and
                    // q1_calib blocks, or f16 blocks and one of the tiled pairs.
                    let both = d <= 128
                        && ([kf, vf]
                            .iter()
                            .all(|f| matches!(f, FormatId::F16 | FormatId::Q1Calib))
                            || tiled_pair(kf, vf));
                    let arena = DeviceBuffer::from_slice(&arena, &stream).unwrap();
                    let qd = DeviceBuffer::from_slice(&q, &stream).unwrap();
                    for generic in if both { vec![true, false] } else { vec![true] } {
                        plan.generic_only = generic;
                        let path = if generic { "generic" } else { "tensor-core" };
                        let what = format!("{kf}/{vf} d={d} heads {n_head}/{n_head_kv} {path}");
                        let checked = launch_against(
                            &plan,
                            &arena,
                            &qd,
                            &want,
                            scale_of(d),
                            delta,
                            &what,
                            &stream,
                        );
                        if let Err(failure) = checked {
                            eprintln!("{failure}");
                            failures.push(failure);
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} K/V pairs differ", failures.len());
}

/// Work items of many small blocks (more than the tiled kernels keep on chip, each a partial
/// 32-token unit) equal the CPU's on every path, for the tiled pairs.
#[test]
fn decode_attention_over_long_items_matches_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed(
        "decode_attention_over_long_items_matches_the_cpu",
    ));
    let params = QuantParams::default();
    let (n_head, n_head_kv, d) = (8usize, 2usize, 128usize);
    let fs = device_formats();
    for f in [FormatId::Kivi2, FormatId::Q2Had]
        .into_iter()
        .filter(|f| fs.contains(f))
    {
        let (mut arena, mut descs, mut work, mut heads) = (vec![], vec![], vec![], vec![]);
        for kv in 0..n_head_kv {
            let mut hb = HeadBlocks { blocks: vec![] };
            let first = descs.len();
            for b in 0..150 {
                let n = if b % 3 == 0 { 40 } else { 7 };
                let blk = CpuBlock::random(&mut rng, f, f, n, d, -1, &[], &params);
                hb.push(blk, &mut arena, &mut descs);
            }
            // Head 0: one item of all 150 blocks; head 1: items of 100 and 50.
            let split: &[(usize, usize)] = if kv == 0 {
                &[(0, 150)]
            } else {
                &[(0, 100), (100, 50)]
            };
            push_items(&mut work, kv, first, split);
            heads.push(hb);
        }
        let q: Vec<f32> = rng.normals(n_head * d);
        let scale = 1.0 / (d as f32).sqrt();
        let want = cpu_outputs(&heads, &q, n_head, n_head_kv, d, scale, 3.0);
        let mut plan = DecodePlan::new(&descs, &work, 1, n_head, n_head_kv, d, 0, &stream).unwrap();
        let arena = DeviceBuffer::from_slice(&arena, &stream).unwrap();
        let qd = DeviceBuffer::from_slice(&q, &stream).unwrap();
        for generic in [true, false] {
            plan.generic_only = generic;
            let what = format!("{f} long items generic {generic}");
            launch_against(&plan, &arena, &qd, &want, scale, 3.0, &what, &stream).unwrap();
        }
    }
}

/// An AKVQ cache's head as the device cache builds it: q4_had text blocks, q2_had visual
/// blocks with and without pivots, an f16 residual, one work item of all of them (and items
/// of one or two blocks on other heads). The tiled kernel switches width per block and equals
/// the CPU's, as does the generic path.
#[test]
fn akvq_blocks_of_both_widths_in_one_item_match_the_cpu() {
    let Some(stream) = gpu() else { return };
    let fs = device_formats();
    if !fs.contains(&FormatId::Q2Had) || !fs.contains(&FormatId::Q4Had) {
        return;
    }
    let mut rng = Rng::new(common::seed(
        "akvq_blocks_of_both_widths_in_one_item_match_the_cpu",
    ));
    let params = QuantParams::default();
    use FormatId::{F16, Q2Had, Q4Had};
    // (format, tokens, fraction of pivots)
    let layout = [
        (Q4Had, 37, 0.05f32),
        (Q2Had, 128, 0.1),
        (Q2Had, 128, 0.0),
        (Q4Had, 61, 0.0),
        (Q2Had, 90, 0.05),
        (F16, 9, 0.0),
    ];
    for d in HEAD_DIMS.into_iter().filter(|&d| d <= 128) {
        for &(n_head, n_head_kv) in &[(28usize, 4usize), (8, 2)] {
            let (mut arena, mut descs, mut work, mut heads) = (vec![], vec![], vec![], vec![]);
            for kv in 0..n_head_kv {
                let mut hb = HeadBlocks { blocks: vec![] };
                let first = descs.len();
                for &(f, n, frac) in &layout {
                    let mask: Vec<bool> = (0..n).map(|_| rng.uniform() < frac).collect();
                    let b = CpuBlock::random(&mut rng, f, f, n, d, -1, &mask, &params);
                    hb.push(b, &mut arena, &mut descs);
                }
                let items: &[(usize, usize)] = if kv == 0 {
                    &[(0, 6)]
                } else {
                    &[(0, 2), (2, 1), (3, 3)]
                };
                push_items(&mut work, kv, first, items);
                heads.push(hb);
            }
            let q: Vec<f32> = rng.normals(n_head * d);
            let scale = 1.0 / (d as f32).sqrt();
            let want = cpu_outputs(&heads, &q, n_head, n_head_kv, d, scale, 3.0);
            let mut plan =
                DecodePlan::new(&descs, &work, 1, n_head, n_head_kv, d, 0, &stream).unwrap();
            let arena = DeviceBuffer::from_slice(&arena, &stream).unwrap();
            let qd = DeviceBuffer::from_slice(&q, &stream).unwrap();
            for generic in [true, false] {
                plan.generic_only = generic;
                let what = format!("akvq mixed d={d} heads {n_head}/{n_head_kv} generic {generic}");
                launch_against(&plan, &arena, &qd, &want, scale, 3.0, &what, &stream).unwrap();
            }
        }
    }
}

/// Formats that keep caller-chosen tokens apart (v1_58_tern's salient tokens, q2_had's and
/// q4_had's pivots): quantized on the GPU with device protect flags, the block equals the
/// CPU's with the same mask byte for byte (n_p, mask, every section moving with it), and
/// decodes as the CPU's does. Masks: all clear, random, all set, first and last only.
#[test]
fn protected_tokens_match_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed("protected_tokens_match_the_cpu"));
    let params = QuantParams::default();
    let mut failures = Vec::new();
    for f in device_formats().into_iter().filter(|f| f.imp().protects()) {
        for d in HEAD_DIMS {
            for &role in f.info().applies.roles() {
                for n in [1usize, 9, 130, 300] {
                    let masks: Vec<Vec<bool>> = vec![
                        vec![false; n],
                        (0..n).map(|_| rng.uniform() < 0.15).collect(),
                        vec![true; n],
                        (0..n).map(|t| t == 0 || t == n - 1).collect(),
                    ];
                    for mask in masks {
                        let x = kv_like(&mut rng, n, d);
                        let shape = Shape { n, d, role };
                        let mut cpu = Vec::new();
                        f.imp()
                            .quantize(&x, shape, &mask, &params, &mut cpu)
                            .unwrap();
                        let n_p = mask.iter().filter(|&&m| m).count();
                        let rows = DeviceBuffer::from_slice(&x, &stream).unwrap();
                        let flags: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
                        let flags = DeviceBuffer::from_slice(&flags, &stream).unwrap();
                        // Not always n_p = n: a v1_58_tern block with 2 of 9 tokens protected
                        // is larger than with all 9.
                        let worst = (0..=n)
                            .map(|p| f.imp().block_size(shape, p, &params).total())
                            .max()
                            .unwrap();
                        let arena = DeviceBuffer::new(align16(worst)).unwrap();
                        arena.fill(0xA5, &stream).unwrap();
                        let job = QuantJob {
                            rows: DeviceRows {
                                buf: &rows,
                                f16: false,
                                offset: 0,
                                stride: d,
                            },
                            n,
                            role,
                            protect: Some((&flags, 0)),
                            out_offset: 0,
                        };
                        kernels::quantize(f, d, &[job], &params, &arena, &stream).unwrap();
                        let mut got = vec![0u8; cpu.len()];
                        arena.download(&mut got, 0, &stream).unwrap();
                        if got != cpu {
                            let at = (0..cpu.len()).find(|&j| got[j] != cpu[j]).unwrap();
                            failures.push(format!(
                                "{f} d={d} {role:?} n={n} n_p={n_p}: {} of {} bytes differ, \
                                 first at {at}: gpu {:?} cpu {:?}",
                                (0..cpu.len()).filter(|&j| got[j] != cpu[j]).count(),
                                cpu.len(),
                                &got[at..(at + 8).min(cpu.len())],
                                &cpu[at..(at + 8).min(cpu.len())]
                            ));
                            continue;
                        }
                        let out = DeviceBuffer::new(n * d * 2).unwrap();
                        out.fill(0xFF, &stream).unwrap();
                        kernels::dequantize(f, d, &[(0, n, role, 0, d)], &arena, &out, &stream)
                            .unwrap();
                        let mut dec = vec![f16::ZERO; n * d];
                        out.download(&mut dec, 0, &stream).unwrap();
                        let mut want = vec![0f32; n * d];
                        f.imp().dequantize(&cpu, shape, &mut want);
                        if let Some(i) = (0..n * d).find(|&i| dec[i] != f16::from_f32(want[i])) {
                            failures.push(format!(
                                "{f} d={d} {role:?} n={n} n_p={n_p}: dequantized element {i}: \
                                 gpu {} cpu {}",
                                dec[i], want[i]
                            ));
                        }
                    }
                }
            }
        }
    }
    for f in &failures {
        eprintln!("{f}");
    }
    assert!(
        failures.is_empty(),
        "{} protected blocks differ",
        failures.len()
    );
}

/// Decode attention over value blocks with protected tokens (several chunks, so ranks carry
/// across chunks) equals the CPU's, GQA 4:1: f16 keys, and keys of the same format with the
/// same protected tokens where it applies to keys; every kernel path.
#[test]
fn decode_attention_with_protected_values_matches_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed(
        "decode_attention_with_protected_values_matches_the_cpu",
    ));
    let params = QuantParams::default();
    let (n_head, n_head_kv) = (8usize, 2usize);
    let values: Vec<FormatId> = device_formats()
        .into_iter()
        .filter(|f| f.imp().protects() && f.info().applies != Applies::Keys)
        .collect();
    let pairs = values.into_iter().flat_map(|vf| {
        let same = (vf.info().applies != Applies::Values).then_some((vf, vf));
        [(FormatId::F16, vf)].into_iter().chain(same)
    });
    for (kf, vf) in pairs {
        for d in HEAD_DIMS {
            let mut arena = Vec::new();
            let (mut descs, mut work, mut heads) = (Vec::new(), Vec::new(), Vec::new());
            for kv in 0..n_head_kv {
                let mut hb = HeadBlocks { blocks: vec![] };
                for (b, n) in [300usize, 128, 45].into_iter().enumerate() {
                    let frac = [0.1f32, 0.5, 1.0][b];
                    let mask: Vec<bool> = (0..n).map(|_| rng.uniform() < frac).collect();
                    let b = CpuBlock::random(&mut rng, kf, vf, n, d, -1, &mask, &params);
                    hb.push(b, &mut arena, &mut descs);
                }
                work.push(WorkItem {
                    seq: 0,
                    kv_head: kv as i32,
                    first_block: (3 * kv) as i32,
                    n_blocks: 3,
                });
                heads.push(hb);
            }
            let q: Vec<f32> = rng.normals(n_head * d);
            let mut plan =
                DecodePlan::new(&descs, &work, 1, n_head, n_head_kv, d, 0, &stream).unwrap();
            let arena = DeviceBuffer::from_slice(&arena, &stream).unwrap();
            let qd = DeviceBuffer::from_slice(&q, &stream).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            let g = n_head / n_head_kv;
            let want: Vec<f32> = (0..n_head)
                .flat_map(|h| cpu_attention(&heads[h / g], &q[h * d..(h + 1) * d], d, scale, 3.0))
                .collect();
            for generic in [true, false] {
                plan.generic_only = generic;
                let what = format!("{kf}/{vf} d={d} generic {generic} protected tokens");
                launch_against(&plan, &arena, &qd, &want, scale, 3.0, &what, &stream).unwrap();
            }
        }
    }
}

/// The k1_5_mix tolerance itself, on the CPU (no GPU needed): it accepts a flipped sign bit
/// only where the CPU's coefficient is 0 to rounding, a scale only as the f16 next to a
/// rounding midpoint, and nothing else.
#[test]
fn k1_5_mix_tolerance_accepts_only_rounding_ties() {
    let mut rng = Rng::new(common::seed(
        "k1_5_mix_tolerance_accepts_only_rounding_ties",
    ));
    let (n, d) = (20, 128);
    let mut x = kv_like(&mut rng, n, d);
    // Token 0 constant over every channel: every coefficient but DC is 0 on the CPU too.
    x[..d].fill(0.5);
    let shape = Shape {
        n,
        d,
        role: Role::Key,
    };
    let params = QuantParams::default();
    let mut cpu = Vec::new();
    FormatId::K1_5Mix
        .imp()
        .quantize(&x, shape, &[], &params, &mut cpu)
        .unwrap();
    assert_eq!(k1_5_mix_tolerated(&x, n, d, &cpu, &cpu), Ok(0));
    let (dh, dl) = (d / 2, d / 2);
    let (scales, codes, stride) = (d / 8 + 4 * dh, d / 8 + 4 * dh + 2 * dl, dh / 4 + dl / 8);
    let flip = |t: usize, k: usize| {
        let mut g = cpu.clone();
        g[codes + t * stride + dh / 4 + k / 8] ^= 1 << (k % 8);
        g
    };
    // Coefficient 5 of token 0 is 0: tolerated. Coefficient 0 (DC) of token 0 is 32: not.
    assert_eq!(k1_5_mix_tolerated(&x, n, d, &flip(0, 5), &cpu), Ok(1));
    assert!(k1_5_mix_tolerated(&x, n, d, &flip(0, 0), &cpu).is_err());
    assert!(k1_5_mix_tolerated(&x, n, d, &flip(7, 3), &cpu).is_err());
    // A scale one f16 away from the CPU's, its mean nowhere near the midpoint: not tolerated.
    let mut g = cpu.clone();
    g[scales + 6] ^= 1;
    assert!(k1_5_mix_tolerated(&x, n, d, &g, &cpu).is_err());
    // A 2-bit code: never.
    let mut g = cpu.clone();
    g[codes + 3 * stride] ^= 1;
    assert!(k1_5_mix_tolerated(&x, n, d, &g, &cpu).is_err());
    // Decoded values: a low-range channel next to a midpoint, not one far from it.
    let low = (0..d).find(|&c| (cpu[c / 8] >> (c % 8)) & 1 == 0).unwrap();
    let (a, b) = (
        f16::from_f32(0.5),
        f16::from_bits(f16::from_f32(0.5).to_bits() + 1),
    );
    let mid = ((a.to_f64() + b.to_f64()) / 2.0) as f32;
    assert!(k1_5_mix_value_tolerated(&cpu, d, low, mid, b));
    assert!(!k1_5_mix_value_tolerated(&cpu, d, low, 0.5, b));
}

/// Work items that are each one whole calibrated span take the one-pass kernel (logits kept on
/// chip); it equals the CPU, the range-pass kernels and the generic kernels on the same blocks.
#[test]
fn calibration_in_one_pass_matches_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = Rng::new(common::seed("calibration_in_one_pass_matches_the_cpu"));
    let params = QuantParams::default();
    let (delta, spans) = (3.0f32, [[128usize, 128, 61], [100, 128, 7]]);
    for d in [64usize, 80, 128] {
        for &(n_head, n_head_kv) in &[(28usize, 4usize), (8, 2)] {
            for vf in [FormatId::Q1Calib, FormatId::F16] {
                let n_seq = 2;
                let (mut arena, mut descs, mut work, mut heads) = (vec![], vec![], vec![], vec![]);
                for seq in 0..n_seq {
                    for kv in 0..n_head_kv {
                        let mut hb = HeadBlocks { blocks: vec![] };
                        for (span, sizes) in spans.iter().enumerate() {
                            work.push(WorkItem {
                                seq,
                                kv_head: kv as i32,
                                first_block: descs.len() as i32,
                                n_blocks: sizes.len() as i32,
                            });
                            for &n in sizes {
                                let b = CpuBlock::random(
                                    &mut rng,
                                    FormatId::Q1Calib,
                                    vf,
                                    n,
                                    d,
                                    span as i32,
                                    &[],
                                    &params,
                                );
                                hb.push(b, &mut arena, &mut descs);
                            }
                        }
                        heads.push(hb);
                    }
                }
                let q: Vec<f32> = rng.normals(n_seq as usize * n_head * d);
                let scale = 1.0 / (d as f32).sqrt();
                let want = cpu_outputs(&heads, &q, n_head, n_head_kv, d, scale, delta);
                let mut plan = DecodePlan::new(
                    &descs,
                    &work,
                    n_seq as usize,
                    n_head,
                    n_head_kv,
                    d,
                    spans.len(),
                    &stream,
                )
                .unwrap();
                assert!(
                    plan.local_spans,
                    "one item per span must take the one-pass kernel"
                );
                let (arena, qd) = (
                    DeviceBuffer::from_slice(&arena, &stream).unwrap(),
                    DeviceBuffer::from_slice(&q, &stream).unwrap(),
                );
                for (local, generic) in [(true, false), (false, false), (false, true)] {
                    plan.local_spans = local;
                    plan.generic_only = generic;
                    let what = format!(
                        "q1_calib/{vf} d={d} heads {n_head}/{n_head_kv} one-pass {local} \
                         generic {generic}"
                    );
                    launch_against(&plan, &arena, &qd, &want, scale, delta, &what, &stream)
                        .unwrap();
                }
            }
        }
    }
}

/// The one-pass rule: every item exactly one calibrated span, whole, within the token limit.
#[test]
fn one_pass_needs_whole_calibrated_spans_per_item() {
    let block = |n: i32, span: i32| BlockDesc {
        k_offset: 0,
        v_offset: 0,
        n,
        k_format: FormatId::Q1Calib as i32,
        v_format: FormatId::Q1Calib as i32,
        span,
    };
    let item = |first_block: i32, n_blocks: i32| WorkItem {
        seq: 0,
        kv_head: 0,
        first_block,
        n_blocks,
    };
    let two_spans = [block(128, 0), block(128, 0), block(64, 1)];
    // Span ids are per sequence and head: another KV head's item of span 0 is its own.
    let other_head = WorkItem {
        kv_head: 1,
        ..item(0, 2)
    };
    assert!(kernels::one_pass_spans(
        &two_spans,
        &[item(0, 2), item(2, 1), other_head]
    ));
    assert!(kernels::one_pass_spans(
        &two_spans,
        &[item(0, 2), item(2, 1)]
    ));
    // A span split over two items, two spans in one item, an uncalibrated block, too long,
    // an item past the table.
    assert!(!kernels::one_pass_spans(
        &two_spans,
        &[item(0, 1), item(1, 2)]
    ));
    assert!(!kernels::one_pass_spans(&two_spans, &[item(0, 3)]));
    assert!(!kernels::one_pass_spans(&[block(16, -1)], &[item(0, 1)]));
    let long = [block(2048, 0), block(1, 0)];
    assert!(!kernels::one_pass_spans(&long, &[item(0, 2)]));
    assert!(kernels::one_pass_spans(&long[..1], &[item(0, 1)]));
    assert!(!kernels::one_pass_spans(&two_spans, &[item(2, 2)]));
    // Blocks that are not calibrated (text, the f16 residual) may have items of their own,
    // beside calibrated spans, within the same token limit; never mixed with a span.
    let with_text = [
        block(128, 0),
        block(100, -1),
        block(200, -1),
        block(2000, -1),
    ];
    assert!(kernels::one_pass_spans(
        &with_text,
        &[item(0, 1), item(1, 2), item(3, 1)]
    ));
    assert!(!kernels::one_pass_spans(
        &with_text,
        &[item(0, 2), item(2, 2)]
    ));
    assert!(!kernels::one_pass_spans(
        &with_text,
        &[item(0, 1), item(1, 3)]
    ));
    // Not calibrated at all: nothing to calibrate in one pass.
    assert!(!kernels::one_pass_spans(&with_text[1..], &[item(0, 1)]));
}

/// The planner's item length (no GPU needed): whole blocks, at most `MAX_ITEM_TOKENS` (one
/// block where a block is longer); a block per item where every block gets a CTA of one wave
/// at no item cost; and the H200's measured
/// cases (132 multiprocessors, two CTAs of the f16 kernel on each), where the rule before left
/// 1.5 or 2 waves.
#[test]
fn item_lengths_fill_whole_waves() {
    use kernels::DecodeFit;
    const BLOCK: usize = 128;
    for sms in [41, 66, 132] {
        for ctas_per_sm in 1..=4 {
            for item_cost in [0.0, 1.0] {
                let fit = DecodeFit {
                    ctas_per_sm,
                    item_cost,
                };
                let slots = sms * ctas_per_sm;
                for pairs in [1, 4, 8, 32, 64] {
                    for tokens in [1, 100, 4096, 16384, 50_000, 65536, 131072] {
                        let item = kernels::item_tokens(tokens, BLOCK, pairs, sms, fit);
                        let blocks = tokens.div_ceil(BLOCK);
                        let case = format!("{pairs} x {tokens} tokens on {sms} x {fit:?}");
                        assert!(item.is_multiple_of(BLOCK), "{item} tokens: {case}");
                        assert!(item <= kernels::MAX_ITEM_TOKENS, "{item}: {case}");
                        if pairs * blocks <= slots && item_cost == 0.0 {
                            assert_eq!(item, BLOCK, "{case}");
                        }
                    }
                }
            }
        }
    }
    // (tokens, pairs) -> tokens per item for the f16 kernel: one wave of 256 items in each.
    let f16 = DecodeFit {
        ctas_per_sm: 2,
        item_cost: 1.0,
    };
    for (tokens, pairs, item) in [(65536, 4, 1024), (131072, 4, 2048), (4096, 32, 512)] {
        assert_eq!(kernels::item_tokens(tokens, BLOCK, pairs, 132, f16), item);
    }
    // Blocks longer than MAX_ITEM_TOKENS: one block per item.
    assert_eq!(kernels::item_tokens(65536, 4096, 4, 132, f16), 4096);
}
