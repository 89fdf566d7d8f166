//! Typed launchers over `kvb_cuda_quantize`, `kvb_cuda_dequantize` and
//! `kvb_cuda_attention_decode`. Device arrays are `DeviceBuffer`s; offsets are bytes.

use super::runtime::{DeviceBuffer, Stream, check};
use super::sys;
use crate::Error;
use crate::kv::{FormatId, QuantParams, Role};

pub use sys::{kvb_cuda_block as BlockDesc, kvb_cuda_work as WorkItem};

/// Device rows of one KV head: token `t`, channel `c` at element `offset + t * stride + c`.
#[derive(Clone, Copy)]
pub struct DeviceRows<'a> {
    pub buf: &'a DeviceBuffer,
    pub f16: bool,
    pub offset: usize,
    pub stride: usize,
}

/// One block to quantize.
pub struct QuantJob<'a> {
    pub rows: DeviceRows<'a>,
    pub n: usize,
    pub role: Role,
    /// `n` flags in device memory, or none.
    pub protect: Option<(&'a DeviceBuffer, usize)>,
    pub out_offset: usize,
}

/// Whether the CUDA kernels implement `format`.
pub fn supports(format: FormatId) -> bool {
    // SAFETY: pure query.
    unsafe { sys::kvb_cuda_format_supported(format as i32) != 0 }
}

/// CTAs that work on each of `n_work` one-pass work items on the current device (see
/// [`one_pass_spans`]): a cluster of two on sm_90 when the items are fewer than the
/// multiprocessors, else one.
pub fn local_ctas(n_work: usize) -> usize {
    let n = i32::try_from(n_work).unwrap_or(i32::MAX);
    // SAFETY: pure query of the current device.
    let ctas = unsafe { sys::kvb_cuda_local_ctas(n) };
    usize::try_from(ctas).unwrap_or(1).max(1)
}

/// The longest work item of a split decode (no one-pass calibration), in tokens. At batch 8
/// and 65536 tokens or more, items of 31 to 61 blocks left the GPU waiting on the last wave's
/// few long items; capped at 2048 tokens, those steps took 11-34% less on the H200.
pub const MAX_ITEM_TOKENS: usize = 2048;

/// How the main kernel of a split decode runs on the device, for sizing its work items (see
/// [`item_tokens`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeFit {
    /// CTAs of the kernel that one multiprocessor runs at once.
    pub ctas_per_sm: usize,
    /// What a work item costs its multiprocessor besides its blocks (its query, the merge of
    /// its warps, its partial), in block-times.
    pub item_cost: f64,
}

/// The [`DecodeFit`] of a split decode of blocks of `formats_used` on the current device.
pub fn decode_fit(
    formats_used: u32,
    head_dim: usize,
    n_head: usize,
    n_head_kv: usize,
    n_spans: usize,
) -> Result<DecodeFit, Error> {
    let int = |x: usize| i32::try_from(x).unwrap_or(i32::MAX);
    let mut fit = sys::kvb_cuda_decode_fit {
        ctas_per_sm: 0,
        item_cost_blocks: 0.0,
    };
    // SAFETY: a query of the current device; `fit` is a valid out-pointer.
    check(
        unsafe {
            sys::kvb_cuda_decode_fit_of(
                formats_used,
                int(head_dim),
                int(n_head),
                int(n_head_kv),
                int(n_spans),
                &mut fit,
            )
        },
        "decode fit",
    )?;
    Ok(DecodeFit {
        ctas_per_sm: usize::try_from(fit.ctas_per_sm).unwrap_or(0).max(1),
        item_cost: f64::from(fit.item_cost_blocks),
    })
}

/// Tokens per work item of a split decode over `pairs` (sequence, KV head) pairs of `tokens`
/// cached tokens each, in blocks of `block` tokens, on `sms` multiprocessors: whole blocks, at
/// most [`MAX_ITEM_TOKENS`] (one block where a block is longer), the length of the least
/// estimated time, the longest of equal ones (fewer partials to merge). Items run in waves of
/// `sms × fit.ctas_per_sm` CTAs, a wave as long as its longest item plus about a block (each
/// CTA's start and end), and every item costs its multiprocessor `fit.item_cost` blocks more:
/// `time = waves · (length + 1) + items / sms · item_cost`, in block-times. The rule before,
/// about four items per multiprocessor, left 1.5 or 2 waves where the kernel fits two or
/// three CTAs: on the H200 our f16 steps took 11-44% longer at 65536 and 131072 tokens,
/// batch 1, and 4096 at batch 8, kivi2's 11-32% longer at batch 1 from 16384 tokens.
pub fn item_tokens(tokens: usize, block: usize, pairs: usize, sms: usize, fit: DecodeFit) -> usize {
    let (block, sms) = (block.max(1), sms.max(1));
    let blocks = tokens.div_ceil(block).max(1);
    let slots = sms * fit.ctas_per_sm.max(1);
    let time = |b: usize| {
        let items = pairs.max(1) * blocks.div_ceil(b);
        (items.div_ceil(slots) * (b + 1)) as f64 + items as f64 / sms as f64 * fit.item_cost
    };
    let longest = (MAX_ITEM_TOKENS / block).clamp(1, blocks);
    let best = (1..=longest)
        .rev()
        .min_by(|&x, &y| time(x).total_cmp(&time(y)));
    best.unwrap_or(1) * block
}

/// Whether `n_work` one-pass items (one per calibrated span) beat a finer split that runs a
/// range pass first. A one-pass step takes about as long as one CTA's share of a span, however
/// few CTAs there are; the split's time grows with the cache. On the H200 one pass won from
/// 64 CTAs on (16384 tokens at batch 1: 2 x 32 CTAs) and lost at 16 (4096 tokens).
pub fn one_pass_pays(n_work: usize, sms: usize) -> bool {
    4 * n_work * local_ctas(n_work) >= sms
}

fn role_id(role: Role) -> i32 {
    match role {
        Role::Key => 0,
        Role::Value => 1,
    }
}

fn params_c(p: &QuantParams) -> sys::kvb_cuda_quant_params {
    sys::kvb_cuda_quant_params {
        calib_alpha_k: p.calib_alpha_k,
        calib_alpha_v: p.calib_alpha_v,
        mix_fraction: p.mix_fraction,
        had_clip: p.had_clip,
    }
}

/// A job table in device memory, checked against the arena it writes into.
pub struct QuantBatch {
    format: FormatId,
    head_dim: usize,
    f16: bool,
    table: DeviceBuffer,
    n_jobs: usize,
    params: QuantParams,
}

impl QuantBatch {
    /// Check and upload `jobs` (all reading rows of one element type) for `arena`.
    pub fn new(
        format: FormatId,
        head_dim: usize,
        jobs: &[QuantJob<'_>],
        params: &QuantParams,
        arena: &DeviceBuffer,
        stream: &Stream,
    ) -> Result<QuantBatch, Error> {
        let f16 = jobs.first().is_some_and(|j| j.rows.f16);
        let elem = if f16 { 2 } else { 4 };
        let raw: Vec<sys::kvb_cuda_quant_job> = jobs
            .iter()
            .map(|j| {
                if j.rows.f16 != f16 {
                    return Err(Error::InvalidArgument("jobs mix f16 and f32 rows".into()));
                }
                let shape = crate::kv::Shape {
                    n: j.n,
                    d: head_dim,
                    role: j.role,
                };
                // With protect flags the block may hold any number of protected tokens, and
                // sizes need not grow with it (v1_58_tern's mask): take the largest.
                let size = |n_p| format.imp().block_size(shape, n_p, params).total();
                let bytes = if j.protect.is_some() && format.imp().protects() {
                    (0..=j.n).map(size).max().unwrap_or(0)
                } else {
                    size(0)
                };
                if j.out_offset + bytes > arena.len() || j.out_offset % 16 != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "block of {bytes} bytes at offset {} of a {}-byte arena \
                         (offsets are 16-aligned)",
                        j.out_offset,
                        arena.len()
                    )));
                }
                let x = j
                    .rows
                    .buf
                    .as_ptr()
                    .cast::<u8>()
                    .wrapping_add(j.rows.offset * elem);
                let protect = j.protect.map_or(std::ptr::null(), |(b, off)| {
                    b.as_ptr().cast::<u8>().wrapping_add(off).cast_const()
                });
                Ok(sys::kvb_cuda_quant_job {
                    x: x.cast(),
                    x_stride: j.rows.stride as i64,
                    protect,
                    out_offset: j.out_offset as u64,
                    n: j.n as i32,
                    role: role_id(j.role),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(QuantBatch {
            format,
            head_dim,
            f16,
            table: {
                // Queued, not waited for: CUDA stages pageable memory before returning.
                let table = DeviceBuffer::new(std::mem::size_of_val(&raw[..]))?;
                table.upload(&raw, 0, stream)?;
                table
            },
            n_jobs: raw.len(),
            params: *params,
        })
    }

    /// Launch one CTA per job on `stream` (asynchronous).
    pub fn launch(&self, arena: &DeviceBuffer, stream: &Stream) -> Result<(), Error> {
        // SAFETY: the table was checked against an arena of this size at construction.
        let code = unsafe {
            sys::kvb_cuda_quantize(
                self.format as i32,
                self.head_dim as i32,
                self.f16 as i32,
                self.table.as_ptr().cast(),
                self.n_jobs as i32,
                params_c(&self.params),
                arena.as_ptr().cast(),
                stream.raw(),
            )
        };
        check(code, "kvb_cuda_quantize")
    }
}

/// Quantize every job of one format into `arena` (one CTA per job) and wait for it.
pub fn quantize(
    format: FormatId,
    head_dim: usize,
    jobs: &[QuantJob<'_>],
    params: &QuantParams,
    arena: &DeviceBuffer,
    stream: &Stream,
) -> Result<(), Error> {
    if jobs.is_empty() {
        return Ok(());
    }
    QuantBatch::new(format, head_dim, jobs, params, arena, stream)?.launch(arena, stream)?;
    stream.synchronize()
}

/// Decode blocks `(offset, n, role)` of one format into f16 rows of `out` at element offsets
/// `(out_offset, stride)`.
pub fn dequantize(
    format: FormatId,
    head_dim: usize,
    blocks: &[(usize, usize, Role, usize, usize)],
    arena: &DeviceBuffer,
    out: &DeviceBuffer,
    stream: &Stream,
) -> Result<(), Error> {
    let raw: Vec<sys::kvb_cuda_dequant_job> = blocks
        .iter()
        .map(
            |&(offset, n, role, out_offset, stride)| sys::kvb_cuda_dequant_job {
                offset: offset as u64,
                out: out
                    .as_ptr()
                    .cast::<u8>()
                    .wrapping_add(2 * out_offset)
                    .cast(),
                out_stride: stride as i64,
                n: n as i32,
                role: role_id(role),
            },
        )
        .collect();
    if raw.is_empty() {
        return Ok(());
    }
    let table = DeviceBuffer::from_slice(&raw, stream)?;
    // SAFETY: live device buffers; the kernel writes n rows of head_dim f16 per job.
    let code = unsafe {
        sys::kvb_cuda_dequantize(
            format as i32,
            head_dim as i32,
            table.as_ptr().cast(),
            raw.len() as i32,
            arena.as_ptr().cast(),
            stream.raw(),
        )
    };
    check(code, "kvb_cuda_dequantize")?;
    stream.synchronize()
}

/// Everything one decode-attention launch reads, already in device memory.
pub struct DecodePlan {
    /// The block table, the work items and their per-(sequence, KV head) starts, one after the
    /// other: one upload per plan.
    tables: DeviceBuffer,
    /// What `tables` holds (a host copy, so that a re-plan sends only what changed).
    uploaded: Vec<u8>,
    work_at: usize,
    begin_at: usize,
    scratch: DeviceBuffer,
    pub n_work: usize,
    pub n_seq: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_spans: usize,
    /// Bit `f` set when some block holds format id `f`: the launcher takes the tensor-core
    /// kernels when every format is one they read.
    pub formats_used: u32,
    /// Use the generic kernels even where the tensor-core ones apply (tests compare both).
    pub generic_only: bool,
    /// Every work item is one whole calibrated span that fits one pass (see
    /// [`one_pass_spans`]); cleared, spans are calibrated by a range pass first.
    pub local_spans: bool,
}

/// Bit `f` set when some block holds format id `f` (see [`DecodePlan::formats_used`]).
pub fn formats_used(blocks: &[BlockDesc]) -> u32 {
    blocks
        .iter()
        .fold(0u32, |m, b| m | 1 << b.k_format | 1 << b.v_format)
}

/// The bytes of plain-data values (the bindgen structs of kvbits_cuda.h have no padding).
fn bytes_of<T: Copy>(x: &[T]) -> &[u8] {
    // SAFETY: any initialized `Copy` value of these padding-free C structs is readable as bytes.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

/// Whether every work item holds either exactly the blocks of one calibrated span or only
/// blocks that are not calibrated, no more than `KVB_CUDA_LOCAL_SPAN_TOKENS` tokens, and some
/// item is calibrated: then the kernels keep each item's logits on chip and read a span's keys
/// once.
pub fn one_pass_spans(blocks: &[BlockDesc], work: &[WorkItem]) -> bool {
    let mut owners = std::collections::HashSet::new();
    work.iter().all(|w| {
        let Some(items) = usize::try_from(w.first_block)
            .ok()
            .zip(usize::try_from(w.n_blocks).ok())
            .and_then(|(first, n)| blocks.get(first..first.checked_add(n)?))
            .filter(|items| !items.is_empty())
        else {
            return false;
        };
        let span = items[0].span;
        let tokens: i64 = items.iter().map(|b| i64::from(b.n)).sum();
        let whole = if span >= 0 {
            items.iter().all(|b| b.span == span) && owners.insert((w.seq, w.kv_head, span))
        } else {
            items.iter().all(|b| b.span < 0)
        };
        whole && tokens <= i64::from(sys::KVB_CUDA_LOCAL_SPAN_TOKENS)
    }) && !owners.is_empty()
}

impl DecodePlan {
    /// Upload a block table and its work items (grouped by sequence, then KV head).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        blocks: &[BlockDesc],
        work: &[WorkItem],
        n_seq: usize,
        n_head: usize,
        n_head_kv: usize,
        head_dim: usize,
        n_spans: usize,
        stream: &Stream,
    ) -> Result<DecodePlan, Error> {
        let mut plan = DecodePlan {
            tables: DeviceBuffer::new(0)?,
            uploaded: Vec::new(),
            work_at: 0,
            begin_at: 0,
            scratch: DeviceBuffer::new(0)?,
            n_work: 0,
            n_seq,
            n_head,
            n_head_kv,
            head_dim,
            n_spans,
            formats_used: 0,
            generic_only: false,
            local_spans: false,
        };
        plan.update(blocks, work, n_spans, stream)?;
        stream.synchronize()?;
        Ok(plan)
    }

    /// Describe new blocks and work items of the same shape, reusing the device buffers where
    /// they are large enough. The uploads are queued on `stream` from pageable memory, which
    /// CUDA stages before returning.
    pub fn update(
        &mut self,
        blocks: &[BlockDesc],
        work: &[WorkItem],
        n_spans: usize,
        stream: &Stream,
    ) -> Result<(), Error> {
        let local_spans = one_pass_spans(blocks, work);
        self.uploaded.clear();
        let formats = formats_used(blocks);
        self.update_tail(0, blocks, work, n_spans, formats, local_spans, stream)
    }

    /// [`DecodePlan::update`] for a block table whose first `kept` blocks are those of the last
    /// upload, followed by `tail`: only the tail, the work items and their starts travel (a
    /// cache re-plans every decode step, and mostly its residual changed). `formats_used` and
    /// `local_spans` are the caller's, as [`DecodePlan`] documents them.
    #[allow(clippy::too_many_arguments)]
    pub fn update_tail(
        &mut self,
        kept: usize,
        tail: &[BlockDesc],
        work: &[WorkItem],
        n_spans: usize,
        formats_used: u32,
        local_spans: bool,
        stream: &Stream,
    ) -> Result<(), Error> {
        let kept_bytes = kept * std::mem::size_of::<BlockDesc>();
        if kept_bytes > self.uploaded.len() {
            return Err(Error::InvalidArgument(format!(
                "{kept} blocks kept of a plan of {} bytes",
                self.uploaded.len()
            )));
        }
        let n_blocks = kept + tail.len();
        let keys = self.n_seq * self.n_head_kv;
        let mut begin = vec![0i32; keys + 1];
        for w in work {
            let key = w.seq as usize * self.n_head_kv + w.kv_head as usize;
            let blocks_ok = w.first_block >= 0
                && w.n_blocks >= 0
                && (w.first_block as usize + w.n_blocks as usize) <= n_blocks;
            if key >= keys || !blocks_ok {
                return Err(Error::InvalidArgument(format!(
                    "work item of sequence {} head {}, blocks {}+{}, in a plan of {keys} \
                     (sequence, KV head) pairs and {n_blocks} blocks",
                    w.seq, w.kv_head, w.first_block, w.n_blocks
                )));
            }
            begin[key + 1] += 1;
        }
        for i in 1..begin.len() {
            begin[i] += begin[i - 1];
        }
        // SAFETY: pure size computation.
        let scratch = unsafe {
            sys::kvb_cuda_decode_scratch_bytes(
                work.len() as i32,
                self.n_seq as i32,
                self.n_head as i32,
                self.head_dim as i32,
                n_spans as i32,
            )
        };
        let mut tables = std::mem::take(&mut self.uploaded);
        tables.truncate(kept_bytes);
        tables.extend_from_slice(bytes_of(tail));
        tables.resize(tables.len().next_multiple_of(16), 0);
        let work_at = tables.len();
        tables.extend_from_slice(bytes_of(work));
        tables.resize(tables.len().next_multiple_of(16), 0);
        let begin_at = tables.len();
        tables.extend_from_slice(bytes_of(&begin));
        if self.scratch.len() < scratch {
            self.scratch = DeviceBuffer::new(scratch)?;
        }
        let from = if self.tables.len() < tables.len() {
            self.tables = DeviceBuffer::new(tables.len())?;
            0
        } else {
            kept_bytes
        };
        self.tables.upload(&tables[from..], from, stream)?;
        self.uploaded = tables;
        (self.work_at, self.begin_at) = (work_at, begin_at);
        self.formats_used = formats_used;
        self.local_spans = local_spans;
        self.n_work = work.len();
        self.n_spans = n_spans;
        Ok(())
    }

    /// Launch decode attention: `q` and `out` hold `[n_seq][n_head][head_dim]` f32.
    pub fn launch(
        &self,
        arena: &DeviceBuffer,
        q: &DeviceBuffer,
        out: &DeviceBuffer,
        scale: f32,
        calib_delta: f32,
        stream: &Stream,
    ) -> Result<(), Error> {
        let values = self.n_seq * self.n_head * self.head_dim * 4;
        if q.len() < values || out.len() < values {
            return Err(Error::InvalidArgument(format!("q/out need {values} bytes")));
        }
        // SAFETY: q and out hold the queries and outputs, checked above.
        unsafe {
            self.launch_raw(
                arena.as_ptr().cast(),
                q.as_ptr().cast(),
                out.as_ptr().cast(),
                scale,
                calib_delta,
                stream,
            )
        }
    }

    /// [`DecodePlan::launch`] on raw device pointers.
    ///
    /// # Safety
    /// `arena` must be the arena the plan's blocks lie in; `q` and `out` must each point to
    /// `n_seq * n_head * head_dim` f32 of device memory.
    pub unsafe fn launch_raw(
        &self,
        arena: *const u8,
        q: *const f32,
        out: *mut f32,
        scale: f32,
        calib_delta: f32,
        stream: &Stream,
    ) -> Result<(), Error> {
        let tables = self.tables.as_ptr().cast::<u8>();
        let args = sys::kvb_cuda_decode_args {
            arena,
            blocks: tables.cast(),
            work: tables.wrapping_add(self.work_at).cast(),
            work_begin: tables.wrapping_add(self.begin_at).cast(),
            q,
            out,
            scratch: self.scratch.as_ptr().cast(),
            n_work: self.n_work as i32,
            n_seq: self.n_seq as i32,
            n_head: self.n_head as i32,
            n_head_kv: self.n_head_kv as i32,
            head_dim: self.head_dim as i32,
            n_spans: self.n_spans as i32,
            scale,
            calib_delta,
            formats_used: self.formats_used,
            generic_only: self.generic_only.into(),
            local_spans: self.local_spans.into(),
        };
        // SAFETY: the plan's tables and scratch are live; the rest is the caller's promise.
        check(
            unsafe { sys::kvb_cuda_attention_decode(&args, stream.raw()) },
            "kvb_cuda_attention_decode",
        )
    }
}
