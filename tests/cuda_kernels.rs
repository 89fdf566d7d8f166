//! CUDA kernels against the CPU reference, for every format the device table implements, every
//! head dim, partial and multi-block spans, several sequences. Skipped (with a message) where
//! there is no GPU. Inputs are fresh random values (seed printed); outputs are poisoned first.
#![cfg(feature = "cuda")]

use half::f16;
use kvbits::cuda::kernels::{self, BlockDesc, DecodePlan, DeviceRows, QuantJob, WorkItem};
use kvbits::cuda::{DeviceBuffer, Stream, device_count};
use kvbits::kv::{Applies, FormatId, HEAD_DIMS, QuantParams, Role, Shape};
use kvbits::rng::{Rng, rel_err};

fn gpu() -> Option<Stream> {
    if device_count() == 0 {
        eprintln!("no CUDA device: skipping GPU test");
        return None;
    }
    Some(Stream::new().expect("stream"))
}

fn seeded() -> Rng {
    let seed = Rng::fresh_seed();
    eprintln!("seed {seed}");
    Rng::new(seed)
}

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

fn roles(f: FormatId) -> Vec<Role> {
    match f.info().applies {
        Applies::Keys => vec![Role::Key],
        Applies::Values => vec![Role::Value],
        Applies::Both => vec![Role::Key, Role::Value],
    }
}

fn device_formats() -> Vec<FormatId> {
    let fs: Vec<FormatId> = FormatId::ALL
        .into_iter()
        .filter(|&f| kernels::supports(f))
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
    let mut rng = seeded();
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
    let mut rng = seeded();
    let params = QuantParams::default();
    let mut failures = Vec::new();
    for f in device_formats() {
        for d in HEAD_DIMS {
            for role in roles(f) {
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
                    for (i, &w) in want.iter().enumerate() {
                        let g = got[first * d + i];
                        assert!(!g.is_nan(), "{f} d={d} n={n}: element {i} not written");
                        assert_eq!(g, f16::from_f32(w), "{f} d={d} {role:?} n={n} element {i}");
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

/// One block of K and V of one KV head, quantized on the CPU.
struct CpuBlock {
    kf: FormatId,
    vf: FormatId,
    kb: Vec<u8>,
    vb: Vec<u8>,
    n: usize,
    span: i32,
}

/// One sequence's blocks of one KV head.
struct HeadBlocks {
    blocks: Vec<CpuBlock>,
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

/// GPU decode attention equals the CPU reference on the same quantized blocks (rel. < 1e-3):
/// every K/V pair of formats on the device, GQA 7:1 and 4:1, spans longer than one block,
/// partial blocks, calibration on q1_calib spans, two sequences, several work items per head.
#[test]
fn decode_attention_matches_the_cpu() {
    let Some(stream) = gpu() else { return };
    let mut rng = seeded();
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
                        n_spans = 1;
                        for kv in 0..n_head_kv {
                            let mut hb = HeadBlocks { blocks: vec![] };
                            let first_block = descs.len();
                            for &(k_fmt, v_fmt, n, span) in &plan {
                                let span = if span >= 0 && kf == FormatId::Q1Calib {
                                    span
                                } else {
                                    -1
                                };
                                let mut kb = Vec::new();
                                let mut vb = Vec::new();
                                k_fmt
                                    .imp()
                                    .quantize(
                                        &kv_like(&mut rng, n, d),
                                        Shape {
                                            n,
                                            d,
                                            role: Role::Key,
                                        },
                                        &[],
                                        &params,
                                        &mut kb,
                                    )
                                    .unwrap();
                                v_fmt
                                    .imp()
                                    .quantize(
                                        &kv_like(&mut rng, n, d),
                                        Shape {
                                            n,
                                            d,
                                            role: Role::Value,
                                        },
                                        &[],
                                        &params,
                                        &mut vb,
                                    )
                                    .unwrap();
                                arena.resize(align16(arena.len()), 0);
                                let k_offset = arena.len() as u64;
                                arena.extend_from_slice(&kb);
                                arena.resize(align16(arena.len()), 0);
                                let v_offset = arena.len() as u64;
                                arena.extend_from_slice(&vb);
                                descs.push(BlockDesc {
                                    k_offset,
                                    v_offset,
                                    n: n as i32,
                                    k_format: k_fmt as i32,
                                    v_format: v_fmt as i32,
                                    span,
                                });
                                hb.blocks.push(CpuBlock {
                                    kf: k_fmt,
                                    vf: v_fmt,
                                    kb,
                                    vb,
                                    n,
                                    span,
                                });
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
                    let g = n_head / n_head_kv;
                    let mut want = vec![0f32; q.len()];
                    for seq in 0..n_seq as usize {
                        for h in 0..n_head {
                            let at = (seq * n_head + h) * d;
                            let r = cpu_attention(
                                &heads[seq * n_head_kv + h / g],
                                &q[at..at + d],
                                d,
                                scale_of(d),
                                delta,
                            );
                            want[at..at + d].copy_from_slice(&r);
                        }
                    }
                    // Both kernel paths where the tensor-core one applies: f16/q1_calib, D <= 128.
                    let both = [kf, vf]
                        .iter()
                        .all(|f| matches!(f, FormatId::F16 | FormatId::Q1Calib))
                        && d <= 128;
                    for generic in if both { vec![true, false] } else { vec![true] } {
                        plan.generic_only = generic;
                        let path = if generic { "generic" } else { "tensor-core" };
                        let arena = DeviceBuffer::from_slice(&arena, &stream).unwrap();
                        let qd = DeviceBuffer::from_slice(&q, &stream).unwrap();
                        let out = DeviceBuffer::new(q.len() * 4).unwrap();
                        out.fill(0xFF, &stream).unwrap();
                        plan.launch(&arena, &qd, &out, scale_of(d), delta, &stream)
                            .unwrap();
                        let mut got = vec![0f32; q.len()];
                        out.download(&mut got, 0, &stream).unwrap();
                        assert!(
                            got.iter().all(|v| v.is_finite()),
                            "{kf}/{vf} d={d}: unwritten or non-finite output"
                        );
                        let e = rel_err(&got, &want);
                        eprintln!(
                            "{kf}/{vf} d={d} heads {n_head}/{n_head_kv} {path}: rel err {e:.2e}"
                        );
                        assert!(
                            e < 1e-3,
                            "{kf}/{vf} d={d} heads {n_head}/{n_head_kv} {path}: rel err {e}"
                        );
                    }
                }
            }
        }
    }
}
