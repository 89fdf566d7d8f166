//! Appending: validate, push into the f16 residual, then quantize what has aged out of it.
//!
//! A run (a span's tokens still in the residual) is quantized once its tokens are older than
//! the last `recent_f16`: in full blocks while its span may still grow or its tail is still
//! recent, whole (last block partial) once the span is closed and entirely old. Text spans
//! close when another span follows; a visual span is complete when appended.

use super::{Block, CacheConfig, Head, KvCache, Layer, Modality, Rows, Run, Stored};
use crate::Error;
use crate::kv::format::F16_MAX;
use crate::kv::simd::{self, f16::f16s_to_f32, f16::f32s_to_f16};
use crate::kv::{BlockSize, FormatId, Role, Shape};
use rayon::prelude::*;

/// Buffers reused across appends, so that flushing allocates only while they grow.
#[derive(Default)]
pub(super) struct Scratch {
    /// One block (or chunk) of one head, as f32.
    x: Vec<f32>,
    /// Saliency-protected tokens of the chunk being quantized (the same for every head).
    salient: Vec<bool>,
    /// Protected tokens of the chunk, `[n_head_kv][len]`; empty when nothing is protected.
    masks: Vec<bool>,
    norms: Vec<f32>,
    sorted: Vec<f32>,
    order: Vec<usize>,
    /// Offset and size of the block being stored, per head: K, and the role in progress.
    k_sizes: Vec<(usize, BlockSize)>,
    sizes: Vec<(usize, BlockSize)>,
    chunks: Vec<Chunk>,
    arenas: Vec<(usize, usize)>,
}

/// The oldest `len` residual tokens of run `run`, to quantize now.
#[derive(Clone, Copy)]
struct Chunk {
    run: usize,
    len: usize,
}

/// A layer's residual state before an append, to undo it if the append fails.
struct Mark {
    n_tokens: usize,
    n_res: usize,
    n_runs: usize,
    last_run_n: usize,
    n_spans: usize,
    open_text: bool,
}

impl Rows<'_> {
    fn len(self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::F16(x) => x.len(),
        }
    }

    /// Rejects what the f16 residual cannot hold: NaN, infinities, values beyond ±65504.
    fn check(self, row: usize) -> Result<(), Error> {
        let bad = match self {
            Rows::F32(x) => x.iter().position(|v| !v.is_finite() || v.abs() > F16_MAX),
            Rows::F16(x) => x.iter().position(|v| !v.is_finite()),
        };
        let Some(i) = bad else { return Ok(()) };
        let (token, channel) = (i / row, i % row);
        match self {
            Rows::F32(x) if x[i].is_finite() => Err(Error::InvalidArgument(format!(
                "value {} at token {token}, channel {channel} is beyond the f16 range \
                 (±{F16_MAX}) of a KV cache",
                x[i]
            ))),
            _ => Err(Error::NonFinite { token, channel }),
        }
    }

    /// Appends the `d` values of token `t`, KV head `g` (of `h`) to `out` as f16.
    fn push_row(self, t: usize, g: usize, h: usize, d: usize, out: &mut Vec<u8>) {
        let at = (t * h + g) * d;
        match self {
            Rows::F32(x) => f32s_to_f16(&x[at..at + d], out),
            Rows::F16(x) => x[at..at + d]
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        }
    }
}

impl KvCache {
    /// Appends `n_tokens` rows of K and V (`[n_tokens][n_head_kv][head_dim]`) to `layer`,
    /// then quantizes what has aged out of the f16 residual. `saliency`, one value per token,
    /// ranks a visual span's tokens for protection (`protect_fraction`).
    ///
    /// On error the cache is left as it was. A [`Error::NonFinite`] counts tokens from the
    /// start of this append and channels across the whole row (`head * head_dim + c`).
    pub fn append(
        &mut self,
        layer: usize,
        k: Rows<'_>,
        v: Rows<'_>,
        n_tokens: usize,
        modality: Modality,
        saliency: Option<&[f32]>,
    ) -> Result<(), Error> {
        self.layer(layer)?;
        let row = self.cfg.n_head_kv * self.cfg.head_dim;
        if n_tokens == 0 {
            return Err(Error::InvalidArgument(
                "append of 0 tokens: pass at least one".into(),
            ));
        }
        for (name, rows) in [("K", k), ("V", v)] {
            if rows.len() != n_tokens * row {
                return Err(Error::InvalidArgument(format!(
                    "{name} rows: {n_tokens} tokens x {} KV heads x {} dims need {} values, got {}",
                    self.cfg.n_head_kv,
                    self.cfg.head_dim,
                    n_tokens * row,
                    rows.len()
                )));
            }
        }
        if let Some(s) = saliency {
            if s.len() != n_tokens {
                return Err(Error::InvalidArgument(format!(
                    "saliency has {} entries for {n_tokens} tokens",
                    s.len()
                )));
            }
            if let Some(i) = s.iter().position(|x| !x.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "saliency of token {i} is {}: it must be finite",
                    s[i]
                )));
            }
        }
        k.check(row)?;
        v.check(row)?;

        let lay = &mut self.layers[layer];
        let mark = lay.mark();
        lay.push(k, v, n_tokens, modality, saliency, self.cfg.head_dim);
        if let Err(e) = flush(&self.cfg, lay, &mut self.scratch, false) {
            lay.rewind(mark, self.cfg.head_dim);
            return Err(e);
        }
        Ok(())
    }

    /// Quantizes everything still in the f16 residual (ignoring `recent_f16`), partial
    /// blocks included, and ends the current text span: what `kvbits eval` measures a
    /// format's own cost with.
    pub fn flush(&mut self) {
        for lay in &mut self.layers {
            lay.open_text = false;
            // A block its format refuses is stored f16, which takes any value the residual
            // holds: there is no error to report. Were there one, the tokens would stay in
            // the residual, where attention still sees them.
            let _ = flush(&self.cfg, lay, &mut self.scratch, true);
        }
    }
}

impl Layer {
    fn mark(&self) -> Mark {
        Mark {
            n_tokens: self.n_tokens,
            n_res: self.n_res,
            n_runs: self.runs.len(),
            last_run_n: self.runs.last().map_or(0, |r| r.n),
            n_spans: self.n_spans,
            open_text: self.open_text,
        }
    }

    fn rewind(&mut self, m: Mark, d: usize) {
        for h in &mut self.heads {
            h.k_res.truncate(m.n_res * d * 2);
            h.v_res.truncate(m.n_res * d * 2);
        }
        self.saliency.truncate(m.n_res);
        self.runs.truncate(m.n_runs);
        if let Some(r) = self.runs.last_mut() {
            r.n = m.last_run_n;
        }
        self.n_tokens = m.n_tokens;
        self.n_res = m.n_res;
        self.n_spans = m.n_spans;
        self.open_text = m.open_text;
    }

    /// Whether run `r`'s span can still grow (an open text span).
    fn is_open(&self, r: &Run) -> bool {
        self.open_text && r.span + 1 == self.n_spans
    }

    /// Adds validated rows to the residual: consecutive text appends extend one span, every
    /// visual append starts its own.
    fn push(
        &mut self,
        k: Rows<'_>,
        v: Rows<'_>,
        n: usize,
        modality: Modality,
        saliency: Option<&[f32]>,
        d: usize,
    ) {
        let text = modality == Modality::Text;
        let extends = text && self.open_text;
        match self.runs.last_mut() {
            Some(r) if extends && r.span + 1 == self.n_spans => r.n += n,
            _ => {
                if !extends {
                    self.n_spans += 1;
                }
                self.runs.push(Run {
                    span: self.n_spans - 1,
                    modality,
                    n,
                    salient: saliency.is_some(),
                });
            }
        }
        self.open_text = text;
        match saliency {
            Some(s) => self.saliency.extend_from_slice(s),
            None => self.saliency.resize(self.saliency.len() + n, 0.0),
        }
        let h = self.heads.len();
        for (g, head) in self.heads.iter_mut().enumerate() {
            for t in 0..n {
                k.push_row(t, g, h, d, &mut head.k_res);
                v.push_row(t, g, h, d, &mut head.v_res);
            }
        }
        self.n_res += n;
        self.n_tokens += n;
    }
}

/// Quantizes the residual runs that are due (all of them when `force`). Either every due
/// chunk is stored and leaves the residual, or nothing changes.
fn flush(cfg: &CacheConfig, lay: &mut Layer, s: &mut Scratch, force: bool) -> Result<(), Error> {
    let old_end = if force {
        lay.n_tokens
    } else {
        lay.n_tokens.saturating_sub(cfg.recent_f16)
    };
    s.chunks.clear();
    let mut pos = lay.n_tokens - lay.n_res;
    for (i, run) in lay.runs.iter().enumerate() {
        let old = old_end.saturating_sub(pos).min(run.n);
        if old == run.n && (force || !lay.is_open(run)) {
            s.chunks.push(Chunk { run: i, len: run.n });
            pos += run.n;
        } else {
            let bt = cfg.block_len();
            let len = old / bt * bt;
            if len > 0 {
                s.chunks.push(Chunk { run: i, len });
            }
            break;
        }
    }
    if s.chunks.is_empty() {
        return Ok(());
    }

    let n_blocks = lay.blocks.len();
    s.arenas.clear();
    s.arenas
        .extend(lay.heads.iter().map(|h| (h.k.len(), h.v.len())));
    let mut off = 0;
    for i in 0..s.chunks.len() {
        let c = s.chunks[i];
        let run = lay.runs[c.run];
        if let Err(e) = quantize(cfg, lay, s, run, off, c.len) {
            lay.blocks.truncate(n_blocks);
            for (h, &(k, v)) in lay.heads.iter_mut().zip(&s.arenas) {
                h.k.truncate(k);
                h.v.truncate(v);
                h.at.truncate(n_blocks);
            }
            return Err(e);
        }
        off += c.len;
    }

    let bytes = off * cfg.head_dim * 2;
    for h in &mut lay.heads {
        h.k_res.drain(..bytes);
        h.v_res.drain(..bytes);
    }
    lay.saliency.drain(..off);
    lay.n_res -= off;
    let whole = s
        .chunks
        .iter()
        .take_while(|c| c.len == lay.runs[c.run].n)
        .count();
    let partial = s.chunks.get(whole).map(|c| c.len);
    lay.runs.drain(..whole);
    if let Some(len) = partial {
        lay.runs[0].n -= len;
    }
    Ok(())
}

/// Quantizes `len` residual tokens of `run`, starting `off` tokens into the residual, into
/// blocks of at most `block_len` tokens, in every KV head; records the blocks.
fn quantize(
    cfg: &CacheConfig,
    lay: &mut Layer,
    s: &mut Scratch,
    run: Run,
    off: usize,
    len: usize,
) -> Result<(), Error> {
    let (kf, vf) = cfg.formats(run.modality);
    let bt = cfg.block_len();
    let first = lay.n_tokens - lay.n_res + off;
    let b0 = lay.blocks.len();
    lay.blocks.extend((0..len).step_by(bt).map(|t| Block {
        first: first + t,
        n_tokens: bt.min(len - t),
        span: run.span,
        modality: run.modality,
        k: kf,
        v: vf,
    }));
    protect_masks(cfg, lay, s, run, off, len);
    for i in b0..lay.blocks.len() {
        let b = lay.blocks[i];
        let job = |f, role| Job {
            f,
            role,
            res: off + b.first - first,
            n: b.n_tokens,
            mask_at: b.first - first,
            chunk: len,
        };
        let k = store_role(cfg, &mut lay.heads, s, job(kf, Role::Key))?;
        std::mem::swap(&mut s.k_sizes, &mut s.sizes);
        let v = store_role(cfg, &mut lay.heads, s, job(vf, Role::Value))?;
        lay.blocks[i].k = k;
        lay.blocks[i].v = v;
        for ((h, &(k_off, k)), &(v_off, v)) in lay.heads.iter_mut().zip(&s.k_sizes).zip(&s.sizes) {
            h.at.push(Stored { k_off, k, v_off, v });
        }
    }
    Ok(())
}

/// Fills `s.masks` (`[n_head_kv][len]`, or empty when no rule applies) with the tokens to
/// protect in a chunk: the most salient of a visual span (`protect_fraction`) and, per head,
/// the pivots (`pivot_factor`). Only formats that protect get masks.
fn protect_masks(
    cfg: &CacheConfig,
    lay: &Layer,
    s: &mut Scratch,
    run: Run,
    off: usize,
    len: usize,
) {
    let (kf, vf) = cfg.formats(run.modality);
    let protects = kf.imp().protects() || vf.imp().protects();
    let by_saliency =
        protects && run.modality == Modality::Visual && run.salient && cfg.protect_fraction > 0.0;
    let pivots = cfg.pivot_factor.filter(|_| protects);
    s.masks.clear();
    if !by_saliency && pivots.is_none() {
        return;
    }
    if by_saliency {
        top_fraction(
            &lay.saliency[off..off + len],
            cfg.protect_fraction,
            &mut s.order,
            &mut s.salient,
        );
    }
    let d = cfg.head_dim;
    for head in &lay.heads {
        let at = s.masks.len();
        if by_saliency {
            s.masks.extend_from_slice(&s.salient);
        } else {
            s.masks.resize(at + len, false);
        }
        if let Some(f) = pivots {
            s.x.resize(len * d, 0.0);
            let bytes = &head.k_res[off * d * 2..(off + len) * d * 2];
            let shape = Shape {
                n: len,
                d,
                role: Role::Key,
            };
            FormatId::F16.imp().dequantize(bytes, shape, &mut s.x);
            mark_pivots(&s.x, d, f, &mut s.norms, &mut s.sorted, &mut s.masks[at..]);
        }
    }
}

/// One block of one role, to store in every KV head.
#[derive(Clone, Copy)]
struct Job {
    f: FormatId,
    role: Role,
    /// First token in the residual.
    res: usize,
    n: usize,
    /// First token in the chunk (its row of `Scratch::masks`), and the chunk's length.
    mask_at: usize,
    chunk: usize,
}

/// Stores the job's block in every head, offsets and sizes in `s.sizes`; returns the format
/// used. Should the format refuse the values (a scale beyond f16 after a rotation or a
/// transform), the block is stored f16 in every head instead: quantization is deferred, and a
/// cache must not get stuck on tokens it accepted.
fn store_role(
    cfg: &CacheConfig,
    heads: &mut [Head],
    s: &mut Scratch,
    job: Job,
) -> Result<FormatId, Error> {
    let d = cfg.head_dim;
    let shape = Shape {
        n: job.n,
        d,
        role: job.role,
    };
    let f = job.f.imp();
    let masks = &s.masks;
    // Heads in parallel, each into its own arena: the bytes do not depend on the threads.
    let stored: Vec<Result<(usize, BlockSize), Error>> = heads
        .par_iter_mut()
        .enumerate()
        .map(|(g, head)| {
            let (res, arena) = head.role_mut(job.role);
            let mask = if f.protects() && !masks.is_empty() {
                &masks[g * job.chunk + job.mask_at..][..job.n]
            } else {
                &[]
            };
            let off = arena.len();
            let quantized = ROWS.with_borrow_mut(|x| {
                x.resize(job.n * d, 0.0);
                f16s_to_f32(&res[job.res * d * 2..(job.res + job.n) * d * 2], x);
                simd::quantize(job.f, x, shape, mask, &cfg.quant, arena)
            });
            match quantized {
                Ok(()) => {
                    let size = f.block_size(shape, mask.iter().filter(|&&p| p).count(), &cfg.quant);
                    debug_assert_eq!(
                        arena.len() - off,
                        size.total(),
                        "{} wrote other than its block_size",
                        job.f
                    );
                    Ok((off, size))
                }
                Err(e) => {
                    arena.truncate(off);
                    Err(e)
                }
            }
        })
        .collect();
    s.sizes.clear();
    if stored.iter().any(|r| r.is_err()) {
        for (h, r) in heads.iter_mut().zip(&stored) {
            if let Ok((off, _)) = r {
                h.role_mut(job.role).1.truncate(*off);
            }
        }
        if job.f != FormatId::F16 {
            let f16 = Job {
                f: FormatId::F16,
                ..job
            };
            return store_role(cfg, heads, s, f16);
        }
        return Err(stored
            .into_iter()
            .find_map(Result::err)
            .expect("an error was seen"));
    }
    s.sizes
        .extend(stored.into_iter().map(|r| r.expect("no error")));
    Ok(job.f)
}

thread_local! {
    /// One block of one head as f32, per thread quantizing.
    static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Head {
    /// The residual and the arena of one role.
    fn role_mut(&mut self, role: Role) -> (&[u8], &mut Vec<u8>) {
        match role {
            Role::Key => (&self.k_res, &mut self.k),
            Role::Value => (&self.v_res, &mut self.v),
        }
    }
}

/// `mask[i]` set for the `round(fraction · n)` most salient tokens (ties: lower position).
fn top_fraction(sal: &[f32], fraction: f32, order: &mut Vec<usize>, mask: &mut Vec<bool>) {
    let n = sal.len();
    let count = ((fraction as f64 * n as f64).round() as usize).min(n);
    mask.clear();
    mask.resize(n, false);
    if count == 0 {
        return;
    }
    order.clear();
    order.extend(0..n);
    order.select_nth_unstable_by(count - 1, |&a, &b| {
        sal[b].total_cmp(&sal[a]).then(a.cmp(&b))
    });
    for &i in &order[..count] {
        mask[i] = true;
    }
}

/// ORs into `mask` (one flag per token) the tokens whose key norm exceeds `factor`
/// times the median key norm of `kx` (`[n][d]`).
fn mark_pivots(
    kx: &[f32],
    d: usize,
    factor: f32,
    norms: &mut Vec<f32>,
    sorted: &mut Vec<f32>,
    mask: &mut [bool],
) {
    norms.clear();
    norms.extend(
        kx.chunks_exact(d)
            .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()),
    );
    sorted.clear();
    sorted.extend_from_slice(norms);
    let limit = factor * median(sorted);
    for (m, &n) in mask.iter_mut().zip(norms.iter()) {
        *m |= n > limit;
    }
}

/// Median of a non-empty slice (mean of the two middle values for an even count); reorders it.
fn median(x: &mut [f32]) -> f32 {
    let (n, mid) = (x.len(), x.len() / 2);
    let (below, &mut m, _) = x.select_nth_unstable_by(mid, f32::total_cmp);
    if n % 2 == 1 {
        m
    } else {
        let lower = below.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lower + m) / 2.0
    }
}
