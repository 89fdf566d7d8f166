//! The device-resident cache: the CPU cache's ledger (which tokens become which blocks, and
//! when: `kv::cache::ledger`) with every byte in device memory and every step on the caller's
//! stream.
//!
//! Each layer owns one device arena: its blocks, every head's, from the start (each at a
//! 16-byte aligned offset, as the kernels need), and the f16 residual at the end, one row of
//! `res_cap` tokens per (KV head, role). Appends scatter rows into the residual
//! (`csrc/cache.cu`), then quantize what the ledger says is due with the shared kernels;
//! attention reads blocks and residual in one launch. The arena grows by reallocation.
//!
//! Work is issued on the stream given to each call. Small host tables (quantize jobs, the
//! decode plan) are uploaded from pageable memory, which orders them with the stream: a call
//! returns once its work is queued, not necessarily done. Calls on one cache must use one
//! stream (or be ordered by the caller).

use std::collections::BTreeMap;
use std::os::raw::c_void;

use super::kernels::{self, BlockDesc, DecodePlan, DeviceRows, QuantBatch, QuantJob, WorkItem};
use super::runtime::{DeviceBuffer, Stream, check};
use super::sys;
use crate::Error;
use crate::kv::cache::{Chunk, Head, HeadBlocks, Layer, Masks, Stored, memory_report};
use crate::kv::{Block, CacheConfig, FormatId, KvCache, MemoryReport, Modality, Role, Shape};

/// A block to dequantize: `(offset, n, role, out offset, out stride)`, as
/// [`kernels::dequantize`] takes it.
type DequantBlock = (usize, usize, Role, usize, usize);

/// Head dims the kernels are instantiated for.
const HEAD_DIMS: [usize; 6] = [64, 80, 96, 112, 128, 256];
/// Query heads per KV head the decode kernels take at most.
const MAX_GROUP: usize = 16;
/// Residual tokens per descriptor in a decode plan: pieces small enough to balance items.
const RESIDUAL_PIECE: usize = 256;
/// Tokens of a work item whose logits stay on chip (one-pass calibration).
const LOCAL_TOKENS: usize = sys::KVB_CUDA_LOCAL_SPAN_TOKENS as usize;

/// Where each block of a head lies in its layer's arena.
#[derive(Default)]
struct Placed {
    at: Vec<Stored>,
}

impl HeadBlocks for Placed {
    fn stored(&self) -> &[Stored] {
        &self.at
    }
}

/// One layer's device memory.
struct Arena {
    buf: DeviceBuffer,
    /// Bytes of blocks, from 0.
    used: usize,
    /// Start of the residual rows; the blocks may grow up to it.
    res_base: usize,
    /// Tokens per residual row, and the first live one.
    res_cap: usize,
    res_start: usize,
    /// The decode plan of the layer, built on first use, and whether the layer changed since.
    plan: Option<DecodePlan>,
    stale: bool,
    /// The blocks part of the plan (`None` once blocks changed; rebuilt for other query
    /// heads), and whether `plan` holds it.
    blocks: Option<BlockPlan>,
    blocks_sent: bool,
}

/// A KV cache whose blocks live in device memory.
pub struct DeviceCache {
    cfg: CacheConfig,
    device: usize,
    sms: usize,
    layers: Vec<Layer<Placed>>,
    arenas: Vec<Arena>,
    masks: Masks,
    chunks: Vec<Chunk>,
    /// Set by the append kernel when a row holds a value an f16 residual cannot.
    bad: DeviceBuffer,
}

fn align16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

impl Arena {
    /// An arena with room for `res_base` bytes of blocks and `res_cap` residual tokens.
    fn new(res_base: usize, res_cap: usize, d: usize, h: usize) -> Result<Arena, Error> {
        Ok(Arena {
            buf: DeviceBuffer::new(res_base + 4 * h * res_cap * d)?,
            used: 0,
            res_base,
            res_cap,
            res_start: 0,
            plan: None,
            stale: true,
            blocks: None,
            blocks_sent: false,
        })
    }

    /// Byte offset of residual token `t` (counted from the row's start) of head `g`, `role`.
    fn res_at(&self, g: usize, role: Role, t: usize, d: usize) -> usize {
        let row = 2 * g + role as usize;
        self.res_base + (row * self.res_cap + t) * d * 2
    }

    /// Makes room for `extra` more bytes of blocks and `tokens` live residual tokens from
    /// `res_start` on, moving what is live into a larger arena if needed.
    fn reserve(
        &mut self,
        extra: usize,
        tokens: usize,
        n_res: usize,
        d: usize,
        h: usize,
        stream: &Stream,
    ) -> Result<(), Error> {
        let blocks_fit = self.used + extra <= self.res_base;
        if blocks_fit && self.res_start + tokens <= self.res_cap {
            return Ok(());
        }
        let res_base = if blocks_fit {
            self.res_base
        } else {
            align16((self.used + extra) * 3 / 2)
        };
        let res_cap = if tokens <= self.res_cap {
            self.res_cap
        } else {
            tokens.max(2 * self.res_cap)
        };
        let mut grown = Arena::new(res_base, res_cap, d, h)?;
        grown.used = self.used;
        grown
            .buf
            .copy_range_from(0, &self.buf, 0, self.used, stream)?;
        for g in 0..h {
            for role in [Role::Key, Role::Value] {
                let from = self.res_at(g, role, self.res_start, d);
                let to = grown.res_at(g, role, 0, d);
                grown
                    .buf
                    .copy_range_from(to, &self.buf, from, n_res * d * 2, stream)?;
            }
        }
        // The old arena may still be read by queued work: wait before freeing it.
        stream.synchronize()?;
        *self = grown;
        Ok(())
    }
}

impl DeviceCache {
    /// An empty cache on GPU `device`, for the formats of `cfg`.
    pub fn new(cfg: CacheConfig, device: usize) -> Result<DeviceCache, Error> {
        cfg.validate()?;
        let n = super::device_count();
        if device >= n {
            return Err(Error::InvalidArgument(format!(
                "CUDA device {device} does not exist ({n} visible): pick 0..{n} or check \
                 CUDA_VISIBLE_DEVICES"
            )));
        }
        let _device = super::on_device(device)?;
        if !HEAD_DIMS.contains(&cfg.head_dim) {
            return Err(Error::Unsupported(format!(
                "head dim {} on CUDA: the kernels take {HEAD_DIMS:?}",
                cfg.head_dim
            )));
        }
        for f in [cfg.k_text, cfg.v_text, cfg.k_visual, cfg.v_visual] {
            if !kernels::supports(f) {
                return Err(Error::Unsupported(format!("{f} on CUDA")));
            }
        }
        let (_, sms, _) = super::device_info(device)?;
        let res_cap = cfg.recent_f16 + cfg.block_len();
        let arenas = (0..cfg.n_layer)
            .map(|_| Arena::new(1 << 16, res_cap, cfg.head_dim, cfg.n_head_kv))
            .collect::<Result<_, _>>()?;
        Ok(DeviceCache {
            layers: (0..cfg.n_layer)
                .map(|_| Layer::empty((0..cfg.n_head_kv).map(|_| Placed::default()).collect()))
                .collect(),
            arenas,
            device,
            sms,
            masks: Masks::default(),
            chunks: Vec::new(),
            bad: DeviceBuffer::new(4)?,
            cfg,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    pub fn device(&self) -> usize {
        self.device
    }

    /// Tokens cached in `layer` (0 for a layer out of range).
    pub fn n_tokens(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.n_tokens)
    }

    /// Tokens of `layer` still in the f16 residual (0 for a layer out of range).
    pub fn n_residual(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.n_res)
    }

    /// The quantized blocks of `layer` in token order (empty for a layer out of range).
    pub fn blocks(&self, layer: usize) -> &[Block] {
        self.layers.get(layer).map_or(&[], |l| &l.blocks)
    }

    /// Exact bytes stored, counted as the CPU cache counts them (alignment padding between
    /// blocks is allocator slack, like a vector's spare capacity, and is not counted).
    pub fn memory(&self) -> MemoryReport {
        memory_report(&self.cfg, &self.layers)
    }

    /// Checks `layer` and makes the cache's GPU current for the call.
    fn check_layer(&self, layer: usize) -> Result<super::OnDevice, Error> {
        if layer >= self.cfg.n_layer {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} out of range (the cache has {} layers)",
                self.cfg.n_layer
            )));
        }
        super::on_device(self.device)
    }

    /// Appends `n_tokens` rows of K and V (`[n_tokens][n_head_kv][head_dim]`, f32 or f16 by
    /// `f16`) from device buffers, like [`KvCache::append`]; then quantizes what is due.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        layer: usize,
        k: &DeviceBuffer,
        v: &DeviceBuffer,
        f16: bool,
        n_tokens: usize,
        modality: Modality,
        saliency: Option<&[f32]>,
        stream: &Stream,
    ) -> Result<(), Error> {
        let bytes = n_tokens * self.cfg.n_head_kv * self.cfg.head_dim * if f16 { 2 } else { 4 };
        for (name, b) in [("K", k), ("V", v)] {
            if b.len() < bytes {
                return Err(Error::InvalidArgument(format!(
                    "{name} rows: {n_tokens} tokens need {bytes} bytes, the buffer has {}",
                    b.len()
                )));
            }
        }
        // SAFETY: both buffers hold the rows, checked above.
        unsafe {
            self.append_raw(
                layer,
                k.as_ptr(),
                v.as_ptr(),
                f16,
                n_tokens,
                modality,
                saliency,
                true,
                stream,
            )
        }
    }

    /// [`DeviceCache::append`] from raw device pointers. With `check`, the call waits for the
    /// rows to be copied and rejects a NaN, an infinity or a value beyond ±65504 (the cache is
    /// left as it was); without, such values are stored as the f16 conversion makes them.
    ///
    /// # Safety
    /// `k` and `v` must point to device memory holding the rows, readable in `stream`'s order.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn append_raw(
        &mut self,
        layer: usize,
        k: *const c_void,
        v: *const c_void,
        f16: bool,
        n_tokens: usize,
        modality: Modality,
        saliency: Option<&[f32]>,
        check_values: bool,
        stream: &Stream,
    ) -> Result<(), Error> {
        let _device = self.check_layer(layer)?;
        if n_tokens == 0 {
            return Err(Error::InvalidArgument(
                "append of 0 tokens: pass at least one".into(),
            ));
        }
        if let Some(s) = saliency
            && (s.len() != n_tokens || s.iter().any(|x| !x.is_finite()))
        {
            return Err(Error::InvalidArgument(format!(
                "saliency: expected {n_tokens} finite values, got {} values",
                s.len()
            )));
        }
        let (d, h) = (self.cfg.head_dim, self.cfg.n_head_kv);
        let lay = &mut self.layers[layer];
        let arena = &mut self.arenas[layer];
        arena.reserve(0, lay.n_res + n_tokens, lay.n_res, d, h, stream)?;
        if check_values {
            self.bad.fill(0, stream)?;
        }
        let at = arena.res_start + lay.n_res;
        for (role, rows) in [(Role::Key, k), (Role::Value, v)] {
            let dst = arena
                .buf
                .as_ptr()
                .cast::<u8>()
                .wrapping_add(arena.res_at(0, role, at, d));
            // SAFETY: the rows are the caller's promise; the destination rows lie in the arena
            // (reserved above); the flag is a live 4-byte buffer.
            let code = unsafe {
                sys::kvb_cuda_scatter_rows(
                    rows,
                    f16.into(),
                    n_tokens as i32,
                    h as i32,
                    d as i32,
                    dst.cast(),
                    (2 * arena.res_cap * d) as i64,
                    self.bad.as_ptr().cast(),
                    stream.raw(),
                )
            };
            check(code, "kvb_cuda_scatter_rows")?;
        }
        if check_values {
            let mut bad = [0u32];
            self.bad.download(&mut bad, 0, stream)?;
            if bad[0] != 0 {
                return Err(Error::InvalidArgument(
                    "K or V rows hold a NaN, an infinity or a value beyond the f16 range \
                     (±65504) of a KV cache"
                        .into(),
                ));
            }
        }
        let mark = lay.mark();
        lay.push_runs(n_tokens, modality, saliency);
        arena.stale = true;
        if let Err(e) = self.flush_layer(layer, false, stream) {
            let lay = &mut self.layers[layer];
            lay.rewind_ledger(mark);
            return Err(e);
        }
        Ok(())
    }

    /// Quantizes everything still in the residual, like [`KvCache::flush`].
    pub fn flush(&mut self, stream: &Stream) -> Result<(), Error> {
        let _device = super::on_device(self.device)?;
        for layer in 0..self.cfg.n_layer {
            self.layers[layer].open_text = false;
            self.flush_layer(layer, true, stream)?;
        }
        Ok(())
    }

    /// Quantizes the due residual chunks of `layer` (all with `force`). Either every due chunk
    /// is stored and leaves the residual, or the ledger is unchanged.
    fn flush_layer(&mut self, layer: usize, force: bool, stream: &Stream) -> Result<(), Error> {
        let lay = &mut self.layers[layer];
        lay.due_chunks(&self.cfg, force, &mut self.chunks);
        if self.chunks.is_empty() {
            return Ok(());
        }
        let n_blocks = lay.blocks.len();
        let placed: Vec<usize> = lay.heads.iter().map(|p| p.at.len()).collect();
        let used = self.arenas[layer].used;
        let result = (|| {
            let mut off = 0;
            for c in self.chunks.clone() {
                self.quantize_chunk(layer, c, off, stream)?;
                off += c.len;
            }
            Ok(())
        })();
        let lay = &mut self.layers[layer];
        let arena = &mut self.arenas[layer];
        (arena.stale, arena.blocks) = (true, None);
        if let Err(e) = result {
            lay.blocks.truncate(n_blocks);
            for (p, &n) in lay.heads.iter_mut().zip(&placed) {
                p.at.truncate(n);
            }
            arena.used = used;
            return Err(e);
        }
        arena.res_start += lay.retire(&self.chunks);
        Ok(())
    }

    /// Quantizes `c.len` residual tokens of run `c.run`, `off` tokens into the residual.
    fn quantize_chunk(
        &mut self,
        layer: usize,
        c: Chunk,
        off: usize,
        stream: &Stream,
    ) -> Result<(), Error> {
        let cfg = &self.cfg;
        let (d, h) = (cfg.head_dim, cfg.n_head_kv);
        let lay = &mut self.layers[layer];
        let run = lay.runs[c.run];
        let b0 = lay.plan_blocks(cfg, run, off, c.len);
        let first = lay.blocks[b0].first;

        // Masks: saliency on the host; pivot norms computed on the device, fetched once.
        let arena = &self.arenas[layer];
        let res0 = arena.res_start + off;
        let mut norms: Option<Result<Vec<f32>, Error>> = None;
        lay.protect_masks(cfg, run, off, c.len, &mut self.masks, |g, out| {
            let all = norms.get_or_insert_with(|| key_norms(arena, res0, c.len, d, h, stream));
            out.clear();
            if let Ok(all) = all {
                out.extend_from_slice(&all[g * c.len..(g + 1) * c.len]);
            }
        });
        if let Some(Err(e)) = norms {
            return Err(e);
        }
        let masks = &self.masks.masks;
        let protect = if masks.is_empty() {
            None
        } else {
            let flags: Vec<u8> = masks.iter().map(|&m| m.into()).collect();
            Some(DeviceBuffer::from_slice(&flags, stream)?)
        };

        // Sizes and offsets of every (block, head, role), then room for them.
        let mut plan = Vec::new();
        let mut bytes = 0;
        for (i, b) in lay.blocks[b0..].iter().enumerate() {
            let mask_at = b.first - first;
            for g in 0..h {
                let mask = if masks.is_empty() {
                    &[][..]
                } else {
                    &masks[g * c.len + mask_at..][..b.n_tokens]
                };
                let n_p = mask.iter().filter(|&&p| p).count();
                let size = |f: FormatId, role| {
                    let n_p = if f.imp().protects() { n_p } else { 0 };
                    let shape = Shape {
                        n: b.n_tokens,
                        d,
                        role,
                    };
                    f.imp().block_size(shape, n_p, &cfg.quant)
                };
                let (k, v) = (size(b.k, Role::Key), size(b.v, Role::Value));
                plan.push((b0 + i, g, mask_at, k, v));
                bytes += align16(k.total()) + align16(v.total());
            }
        }
        let arena = &mut self.arenas[layer];
        arena.reserve(bytes, lay.n_res, lay.n_res, d, h, stream)?;
        let arena = &self.arenas[layer];
        // The reservation may have moved the residual to the start of its rows.
        let res0 = arena.res_start + off;

        // Jobs read the residual rows in the same arena.
        let mut at = arena.used;
        // One launch per format: K and V of one format go together.
        let mut jobs: BTreeMap<i32, (FormatId, Vec<QuantJob>)> = BTreeMap::new();
        let mut stored = Vec::with_capacity(plan.len());
        for &(bi, g, mask_at, k, v) in &plan {
            let b = lay.blocks[bi];
            let (k_off, v_off) = (at, at + align16(k.total()));
            at = v_off + align16(v.total());
            for (f, role, out_offset) in [(b.k, Role::Key, k_off), (b.v, Role::Value, v_off)] {
                let t0 = res0 + (b.first - first);
                let job = QuantJob {
                    rows: DeviceRows {
                        buf: &arena.buf,
                        f16: true,
                        offset: arena.res_at(g, role, t0, d) / 2,
                        stride: d,
                    },
                    n: b.n_tokens,
                    role,
                    protect: protect
                        .as_ref()
                        .filter(|_| f.imp().protects())
                        .map(|p| (p, g * c.len + mask_at)),
                    out_offset,
                };
                jobs.entry(f as i32)
                    .or_insert_with(|| (f, Vec::new()))
                    .1
                    .push(job);
            }
            stored.push((g, Stored { k_off, k, v_off, v }));
        }
        let batches = jobs
            .values()
            .map(|(f, group)| QuantBatch::new(*f, d, group, &cfg.quant, &arena.buf, stream))
            .collect::<Result<Vec<_>, _>>()?;
        for b in &batches {
            b.launch(&arena.buf, stream)?;
        }
        // The job tables must outlive the launches.
        stream.synchronize()?;
        let arena = &mut self.arenas[layer];
        arena.used = at;
        for (g, s) in stored {
            lay.heads[g].at.push(s);
        }
        Ok(())
    }
}

/// Key norms of `n` residual tokens from row position `t0`, every head: `[h][n]`.
fn key_norms(
    arena: &Arena,
    t0: usize,
    n: usize,
    d: usize,
    h: usize,
    stream: &Stream,
) -> Result<Vec<f32>, Error> {
    let out = DeviceBuffer::new(n * h * 4)?;
    let x = arena
        .buf
        .as_ptr()
        .cast::<u8>()
        .wrapping_add(arena.res_at(0, Role::Key, t0, d));
    // SAFETY: n rows of every head's key residual lie in the arena; `out` holds n * h floats.
    let code = unsafe {
        sys::kvb_cuda_key_norms(
            x.cast(),
            (2 * arena.res_cap * d) as i64,
            n as i32,
            h as i32,
            d as i32,
            out.as_ptr().cast(),
            stream.raw(),
        )
    };
    check(code, "kvb_cuda_key_norms")?;
    let mut norms = vec![0f32; n * h];
    out.download(&mut norms, 0, stream)?;
    Ok(norms)
}

impl DeviceCache {
    /// Softmax attention of one new token, like [`KvCache::attention_decode`]: `q` and `out`
    /// hold `[n_head][head_dim]` f32.
    pub fn attention_decode(
        &mut self,
        layer: usize,
        q: &DeviceBuffer,
        out: &DeviceBuffer,
        n_head: usize,
        scale: f32,
        stream: &Stream,
    ) -> Result<(), Error> {
        let bytes = n_head * self.cfg.head_dim * 4;
        if q.len() < bytes || out.len() < bytes {
            return Err(Error::InvalidArgument(format!(
                "queries and output: {n_head} heads need {bytes} bytes each, the buffers have \
                 {} and {}",
                q.len(),
                out.len()
            )));
        }
        // SAFETY: both buffers are large enough, checked above.
        unsafe {
            self.attention_decode_raw(
                layer,
                q.as_ptr().cast(),
                out.as_ptr().cast(),
                n_head,
                scale,
                stream,
            )
        }
    }

    /// [`DeviceCache::attention_decode`] on raw device pointers.
    ///
    /// # Safety
    /// `q` and `out` must point to `n_head * head_dim` f32 of device memory each, usable in
    /// `stream`'s order.
    pub unsafe fn attention_decode_raw(
        &mut self,
        layer: usize,
        q: *const f32,
        out: *mut f32,
        n_head: usize,
        scale: f32,
        stream: &Stream,
    ) -> Result<(), Error> {
        let _device = self.check_layer(layer)?;
        let h = self.cfg.n_head_kv;
        if n_head == 0 || !n_head.is_multiple_of(h) || n_head / h > MAX_GROUP {
            return Err(Error::InvalidArgument(format!(
                "{n_head} query heads: CUDA decode takes a multiple of the {h} KV heads, at \
                 most {MAX_GROUP} per KV head"
            )));
        }
        if self.layers[layer].n_tokens == 0 {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} has no cached tokens to attend to"
            )));
        }
        if !scale.is_finite() {
            return Err(Error::InvalidArgument("the scale must be finite".into()));
        }
        let arena = &self.arenas[layer];
        if arena.stale || arena.plan.as_ref().is_none_or(|p| p.n_head != n_head) {
            self.replan(layer, n_head, stream)?;
        }
        let arena = &self.arenas[layer];
        let plan = arena.plan.as_ref().expect("built above");
        // SAFETY: the plan describes this arena as it is; q and out are the caller's promise.
        unsafe {
            plan.launch_raw(
                arena.buf.as_ptr().cast(),
                q,
                out,
                scale,
                self.cfg.calib_delta,
                stream,
            )
        }
    }

    /// The table of `layer`'s blocks and their work items, as [`BlockPlan`] describes them.
    fn block_plan(&self, layer: usize, n_head: usize) -> Result<BlockPlan, Error> {
        let cfg = &self.cfg;
        let h = cfg.n_head_kv;
        let lay = &self.layers[layer];
        let calibrated =
            |b: &Block| cfg.calibrate && b.modality == Modality::Visual && b.k == FormatId::Q1Calib;
        let mut descs = Vec::with_capacity(h * lay.blocks.len());
        let mut heads = Vec::with_capacity(h);
        for g in 0..h {
            let start = descs.len();
            for (b, s) in lay.blocks.iter().zip(&lay.heads[g].at) {
                descs.push(BlockDesc {
                    k_offset: s.k_off as u64,
                    v_offset: s.v_off as u64,
                    n: b.n_tokens as i32,
                    k_format: b.k as i32,
                    v_format: b.v as i32,
                    span: if calibrated(b) { b.span as i32 } else { -1 },
                });
            }
            heads.push(start..descs.len());
        }
        // The items of `items(head's descs, their first index, head)`, head by head.
        let per_head = |items: &dyn Fn(&[BlockDesc], usize, usize) -> Items| {
            let by_head = heads.iter().enumerate();
            by_head
                .map(|(g, r)| items(&descs[r.clone()], r.start, g))
                .collect::<Vec<_>>()
        };
        let calibrated = descs.iter().any(|b| b.span >= 0);
        let one_pass = calibrated
            .then(|| per_head(&local_items))
            .filter(|items| kernels::one_pass_spans(&descs, &items.concat()));
        let formats_used = kernels::formats_used(&descs);
        // Sized for the kernel as it runs between appends, with recent f16 tokens beside the
        // blocks.
        let with_recent = formats_used | 1 << FormatId::F16 as u32;
        let n_spans = if calibrated { lay.n_spans } else { 0 };
        let fit = kernels::decode_fit(with_recent, cfg.head_dim, n_head, h, n_spans)?;
        // Blocks of a span each (BlockTokens::All) vary in length: items then take about
        // MAX_ITEM_TOKENS, as split_by_tokens fills them.
        let block = cfg.block_len().min(kernels::MAX_ITEM_TOKENS);
        let blocks_tokens = lay.n_tokens - lay.n_res;
        let tokens = kernels::item_tokens(blocks_tokens, block, h, self.sms, fit);
        let split = per_head(&|d: &[BlockDesc], first, g| split_by_tokens(d, first, g, tokens));
        Ok(BlockPlan {
            n_head,
            descs,
            one_pass,
            split,
            formats_used,
            calibrated,
        })
    }

    /// Brings `layer`'s decode plan up to date: the block part when blocks changed, the
    /// residual (one piece per 256 tokens, after every head's blocks) and the work items on
    /// every step. One item per calibrated span (calibrated in one pass), the residual and
    /// other blocks in items of at most as many tokens, where that gives every SM an item;
    /// else as [`kernels::item_tokens`] splits them.
    fn replan(&mut self, layer: usize, n_head: usize, stream: &Stream) -> Result<(), Error> {
        let blocks = self.arenas[layer].blocks.as_ref();
        if blocks.is_none_or(|b| b.n_head != n_head) {
            let plan = self.block_plan(layer, n_head)?;
            let arena = &mut self.arenas[layer];
            arena.blocks = Some(plan);
            arena.blocks_sent = false;
        }
        let (d, h) = (self.cfg.head_dim, self.cfg.n_head_kv);
        let (lay, arena) = (&self.layers[layer], &self.arenas[layer]);
        let bp = arena.blocks.as_ref().expect("built above");
        let mut tail = Vec::new();
        let mut residual_items = Vec::with_capacity(h);
        for g in 0..h {
            let start = tail.len();
            for t in (0..lay.n_res).step_by(RESIDUAL_PIECE) {
                let at = |role| arena.res_at(g, role, arena.res_start + t, d) as u64;
                tail.push(BlockDesc {
                    k_offset: at(Role::Key),
                    v_offset: at(Role::Value),
                    n: RESIDUAL_PIECE.min(lay.n_res - t) as i32,
                    k_format: FormatId::F16 as i32,
                    v_format: FormatId::F16 as i32,
                    span: -1,
                });
            }
            residual_items.push(local_items(&tail[start..], bp.descs.len() + start, g));
        }
        let n_items = |items: &[Vec<WorkItem>]| items.iter().map(Vec::len).sum::<usize>();
        let one_pass = bp
            .one_pass
            .as_ref()
            .filter(|op| kernels::one_pass_pays(n_items(op) + n_items(&residual_items), self.sms));
        let blocks_items = one_pass.unwrap_or(&bp.split);
        let work: Vec<WorkItem> = blocks_items
            .iter()
            .zip(&residual_items)
            .flat_map(|(b, r)| b.iter().chain(r))
            .copied()
            .collect();
        let residual_formats = if tail.is_empty() {
            0
        } else {
            1 << FormatId::F16 as u32
        };
        let formats_used = bp.formats_used | residual_formats;
        let reuse = arena.plan.as_ref().is_some_and(|p| p.n_head == n_head);
        let kept = if reuse && arena.blocks_sent {
            bp.descs.len()
        } else {
            0
        };
        // Span ids matter only to calibration: without calibrated blocks the plan has none,
        // which the tensor-core kernels of the other formats need.
        let n_spans = if bp.calibrated { lay.n_spans } else { 0 };
        let local = one_pass.is_some();
        let sent = if kept == 0 {
            [&bp.descs[..], &tail[..]].concat()
        } else {
            tail
        };
        let arena = &mut self.arenas[layer];
        if !reuse {
            arena.plan = Some(DecodePlan::new(&[], &[], 1, n_head, h, d, n_spans, stream)?);
        }
        let plan = arena.plan.as_mut().expect("made above");
        plan.update_tail(kept, &sent, &work, n_spans, formats_used, local, stream)?;
        arena.blocks_sent = true;
        arena.stale = false;
        Ok(())
    }
}

/// The blocks part of a layer's decode plan, rebuilt only when blocks or the query heads
/// change: their descriptors (head by head), and per head the work items over them in either
/// split.
struct BlockPlan {
    /// Query heads the items were sized for (the kernel's fit depends on them).
    n_head: usize,
    descs: Vec<BlockDesc>,
    /// One item per calibrated span, the other blocks in items of at most
    /// `LOCAL_TOKENS`; `None` where that does not give a one-pass plan.
    one_pass: Option<Vec<Vec<WorkItem>>>,
    /// Items of [`kernels::item_tokens`] tokens.
    split: Vec<Vec<WorkItem>>,
    formats_used: u32,
    /// Some block is in a calibrated span.
    calibrated: bool,
}

type Items = Vec<WorkItem>;

/// Work items for one-pass calibration over one head's `descs` (at `first` in the table):
/// one per calibrated span, blocks that are not calibrated in items of at most
/// `LOCAL_TOKENS` tokens.
fn local_items(descs: &[BlockDesc], first: usize, head: usize) -> Vec<WorkItem> {
    let (mut filled, mut item) = (0, 0);
    items_by(descs, first, head, |b| {
        if b.span >= 0 {
            return b.span.into();
        }
        if filled + b.n as usize > LOCAL_TOKENS {
            (item, filled) = (item + 1, 0);
        }
        filled += b.n as usize;
        -1 - item
    })
}

/// One work item per run of consecutive descriptors with the same key (`key` is called once
/// per descriptor, in order).
fn items_by(
    descs: &[BlockDesc],
    first: usize,
    head: usize,
    mut key: impl FnMut(&BlockDesc) -> i64,
) -> Vec<WorkItem> {
    let keys: Vec<i64> = descs.iter().map(&mut key).collect();
    let mut at = first;
    keys.chunk_by(|a, b| a == b)
        .map(|run| {
            let item = WorkItem {
                seq: 0,
                kv_head: head as i32,
                first_block: at as i32,
                n_blocks: run.len() as i32,
            };
            at += run.len();
            item
        })
        .collect()
}

/// Work items of about `tokens` tokens each (whole descriptors).
fn split_by_tokens(descs: &[BlockDesc], first: usize, head: usize, tokens: usize) -> Vec<WorkItem> {
    let (mut filled, mut item) = (0, 0);
    items_by(descs, first, head, |b| {
        if filled >= tokens {
            (item, filled) = (item + 1, 0);
        }
        filled += b.n as usize;
        item
    })
}

impl DeviceCache {
    /// Tokens `first..first + n` of `layer` as f16, like [`KvCache::dequantize`]: `k` and `v`
    /// receive `[n][n_head_kv][head_dim]` (device memory, `2 * n * n_head_kv * head_dim`
    /// bytes each).
    ///
    /// # Safety
    /// `k` and `v` must point to that much writable device memory, usable in `stream`'s order.
    pub unsafe fn dequantize_raw(
        &mut self,
        layer: usize,
        first: usize,
        n: usize,
        k: *mut c_void,
        v: *mut c_void,
        stream: &Stream,
    ) -> Result<(), Error> {
        let _device = self.check_layer(layer)?;
        let (d, h) = (self.cfg.head_dim, self.cfg.n_head_kv);
        let (lay, arena) = (&self.layers[layer], &self.arenas[layer]);
        let end = first
            .checked_add(n)
            .filter(|&e| n > 0 && e <= lay.n_tokens)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "tokens {first}..{first}+{n} out of range: layer {layer} has {} tokens",
                    lay.n_tokens
                ))
            })?;
        // Whole blocks overlapping the range decode into rows [t0, t1) laid out like the
        // output, which then takes its rows with one copy per role.
        let overlaps = |b: &&Block| b.first < end && b.first + b.n_tokens > first;
        let res_first = lay.n_tokens - lay.n_res;
        let t0 = lay
            .blocks
            .iter()
            .find(overlaps)
            .map_or(first.max(res_first), |b| b.first);
        let t1 = end.max(
            lay.blocks
                .iter()
                .rfind(overlaps)
                .map_or(0, |b| b.first + b.n_tokens),
        );
        let row = h * d;
        let mut jobs: BTreeMap<(i32, i32), (FormatId, Vec<DequantBlock>)> = BTreeMap::new();
        let mut push = |f: FormatId, role: Role, job| {
            jobs.entry((f as i32, role as i32))
                .or_insert_with(|| (f, Vec::new()))
                .1
                .push(job)
        };
        for g in 0..h {
            for (b, s) in lay
                .blocks
                .iter()
                .zip(&lay.heads[g].at)
                .filter(|(b, _)| overlaps(b))
            {
                let out = (b.first - t0) * row + g * d;
                push(b.k, Role::Key, (s.k_off, b.n_tokens, Role::Key, out, row));
                push(
                    b.v,
                    Role::Value,
                    (s.v_off, b.n_tokens, Role::Value, out, row),
                );
            }
            if end > res_first {
                let (from, m) = (first.max(res_first), end - first.max(res_first));
                let out = (from - t0) * row + g * d;
                for role in [Role::Key, Role::Value] {
                    let at = arena.res_at(g, role, arena.res_start + from - res_first, d);
                    push(FormatId::F16, role, (at, m, role, out, row));
                }
            }
        }
        let rows = [
            DeviceBuffer::new((t1 - t0) * row * 2)?,
            DeviceBuffer::new((t1 - t0) * row * 2)?,
        ];
        for (&(_, role), (f, blocks)) in &jobs {
            kernels::dequantize(*f, d, blocks, &arena.buf, &rows[role as usize], stream)?;
        }
        for (buf, dst) in rows.iter().zip([k, v]) {
            // SAFETY: the rows lie in `buf`; the destination is the caller's promise.
            unsafe { buf.copy_to_ptr((first - t0) * row * 2, dst, n * row * 2, stream)? };
        }
        stream.synchronize()
    }

    /// A copy of this cache in host memory (to save it, or compare it with the CPU's).
    pub fn to_host(&self, stream: &Stream) -> Result<KvCache, Error> {
        let _device = super::on_device(self.device)?;
        let d = self.cfg.head_dim;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (lay, arena) in self.layers.iter().zip(&self.arenas) {
            let mut bytes = vec![0u8; arena.used];
            arena.buf.download(&mut bytes, 0, stream)?;
            let res = lay.n_res * d * 2;
            let mut heads = Vec::with_capacity(lay.heads.len());
            for (g, placed) in lay.heads.iter().enumerate() {
                let mut head = Head::default();
                for s in &placed.at {
                    head.at.push(Stored {
                        k_off: head.k.len(),
                        v_off: head.v.len(),
                        ..*s
                    });
                    head.k.extend_from_slice(&bytes[s.k_off..][..s.k.total()]);
                    head.v.extend_from_slice(&bytes[s.v_off..][..s.v.total()]);
                }
                for (role, out) in [(Role::Key, &mut head.k_res), (Role::Value, &mut head.v_res)] {
                    out.resize(res, 0);
                    arena
                        .buf
                        .download(out, arena.res_at(g, role, arena.res_start, d), stream)?;
                }
                heads.push(head);
            }
            layers.push(lay.with_heads(heads));
        }
        KvCache::from_layers(self.cfg.clone(), layers)
    }

    /// `cache` copied to GPU `device` (a loaded snapshot, or a cache filled on the host).
    pub fn from_host(
        cache: &KvCache,
        device: usize,
        stream: &Stream,
    ) -> Result<DeviceCache, Error> {
        let mut dev = DeviceCache::new(cache.config().clone(), device)?;
        let _device = super::on_device(device)?;
        let (d, h) = (dev.cfg.head_dim, dev.cfg.n_head_kv);
        for (l, lay) in cache.layers().iter().enumerate() {
            let mut bytes = Vec::new();
            let mut heads = Vec::with_capacity(h);
            for head in &lay.heads {
                let mut placed = Placed::default();
                for s in &head.at {
                    let k_off = bytes.len();
                    bytes.extend_from_slice(&head.k[s.k_off..][..s.k.total()]);
                    bytes.resize(align16(bytes.len()), 0);
                    let v_off = bytes.len();
                    bytes.extend_from_slice(&head.v[s.v_off..][..s.v.total()]);
                    bytes.resize(align16(bytes.len()), 0);
                    placed.at.push(Stored { k_off, v_off, ..*s });
                }
                heads.push(placed);
            }
            let arena = &mut dev.arenas[l];
            arena.reserve(bytes.len(), lay.n_res, 0, d, h, stream)?;
            arena.buf.upload(&bytes, 0, stream)?;
            arena.used = bytes.len();
            for (g, head) in lay.heads.iter().enumerate() {
                arena
                    .buf
                    .upload(&head.k_res, arena.res_at(g, Role::Key, 0, d), stream)?;
                arena
                    .buf
                    .upload(&head.v_res, arena.res_at(g, Role::Value, 0, d), stream)?;
            }
            dev.layers[l] = lay.with_heads(heads);
        }
        stream.synchronize()?;
        Ok(dev)
    }
}
