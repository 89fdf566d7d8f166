//! Which tokens become which blocks, and when: the per-layer bookkeeping every cache shares,
//! whatever memory holds its bytes (the CPU cache here, the device cache in `cuda::cache`).
//!
//! A run (a span's tokens still in the residual) is quantized once its tokens are older than
//! the last `recent_f16`: in full blocks while its span may still grow or its tail is still
//! recent, whole (last block partial) once the span is closed and entirely old. Text spans
//! close when another span follows; a visual span is complete when appended.

use super::{Block, CacheConfig, Layer, MemoryReport, Modality, Stored};

/// Consecutive residual tokens of one span.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub span: usize,
    pub modality: Modality,
    pub n: usize,
    /// The caller gave saliency for these tokens.
    pub salient: bool,
}

/// The oldest `len` residual tokens of run `run`, to quantize now.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub run: usize,
    pub len: usize,
}

/// A layer's bookkeeping before an append, to undo it if the append fails.
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    pub n_tokens: usize,
    pub n_res: usize,
    n_runs: usize,
    last_run_n: usize,
    n_spans: usize,
    open_text: bool,
}

impl<H> Layer<H> {
    pub(crate) fn empty(heads: Vec<H>) -> Layer<H> {
        Layer {
            n_tokens: 0,
            blocks: Vec::new(),
            heads,
            runs: Vec::new(),
            saliency: Vec::new(),
            n_res: 0,
            n_spans: 0,
            open_text: false,
        }
    }

    /// The same bookkeeping over other heads (the same cache in other memory).
    #[cfg(feature = "cuda")]
    pub(crate) fn with_heads<G>(&self, heads: Vec<G>) -> Layer<G> {
        Layer {
            n_tokens: self.n_tokens,
            blocks: self.blocks.clone(),
            heads,
            runs: self.runs.clone(),
            saliency: self.saliency.clone(),
            n_res: self.n_res,
            n_spans: self.n_spans,
            open_text: self.open_text,
        }
    }

    pub(crate) fn mark(&self) -> Mark {
        Mark {
            n_tokens: self.n_tokens,
            n_res: self.n_res,
            n_runs: self.runs.len(),
            last_run_n: self.runs.last().map_or(0, |r| r.n),
            n_spans: self.n_spans,
            open_text: self.open_text,
        }
    }

    /// Undoes the bookkeeping of what came after `m` (the heads' bytes are the caller's).
    pub(crate) fn rewind_ledger(&mut self, m: Mark) {
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

    /// Records `n` new residual tokens: consecutive text appends extend one span, every visual
    /// append starts its own.
    pub(crate) fn push_runs(&mut self, n: usize, modality: Modality, saliency: Option<&[f32]>) {
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
        self.n_res += n;
        self.n_tokens += n;
    }

    /// The residual chunks due for quantization (all of them when `force`), oldest first.
    pub(crate) fn due_chunks(&self, cfg: &CacheConfig, force: bool, chunks: &mut Vec<Chunk>) {
        let old_end = if force {
            self.n_tokens
        } else {
            self.n_tokens.saturating_sub(cfg.recent_f16)
        };
        chunks.clear();
        let mut pos = self.n_tokens - self.n_res;
        for (i, run) in self.runs.iter().enumerate() {
            let old = old_end.saturating_sub(pos).min(run.n);
            if old == run.n && (force || !self.is_open(run)) {
                chunks.push(Chunk { run: i, len: run.n });
                pos += run.n;
            } else {
                let bt = cfg.block_len();
                let len = old / bt * bt;
                if len > 0 {
                    chunks.push(Chunk { run: i, len });
                }
                break;
            }
        }
    }

    /// Appends the blocks of `len` residual tokens of `run`, starting `off` tokens into the
    /// residual, in the run's formats; returns the index of the first.
    pub(crate) fn plan_blocks(
        &mut self,
        cfg: &CacheConfig,
        run: Run,
        off: usize,
        len: usize,
    ) -> usize {
        let (kf, vf) = cfg.formats(run.modality);
        let bt = cfg.block_len();
        let first = self.n_tokens - self.n_res + off;
        let b0 = self.blocks.len();
        self.blocks.extend((0..len).step_by(bt).map(|t| Block {
            first: first + t,
            n_tokens: bt.min(len - t),
            span: run.span,
            modality: run.modality,
            k: kf,
            v: vf,
        }));
        b0
    }

    /// Takes quantized `chunks` (as [`Layer::due_chunks`] gave them) out of the residual's
    /// bookkeeping; returns the number of tokens they held.
    pub(crate) fn retire(&mut self, chunks: &[Chunk]) -> usize {
        let off: usize = chunks.iter().map(|c| c.len).sum();
        self.saliency.drain(..off);
        self.n_res -= off;
        let whole = chunks
            .iter()
            .take_while(|c| c.len == self.runs[c.run].n)
            .count();
        let partial = chunks.get(whole).map(|c| c.len);
        self.runs.drain(..whole);
        if let Some(len) = partial {
            self.runs[0].n -= len;
        }
        off
    }

    /// Whether the formats of `run` protect tokens, and which rules apply: the most salient of
    /// a visual span (`protect_fraction`), and key pivots (`pivot_factor`).
    fn protection(&self, cfg: &CacheConfig, run: Run) -> (bool, Option<f32>) {
        let (kf, vf) = cfg.formats(run.modality);
        let protects = kf.imp().protects() || vf.imp().protects();
        let by_saliency = protects
            && run.modality == Modality::Visual
            && run.salient
            && cfg.protect_fraction > 0.0;
        (by_saliency, cfg.pivot_factor.filter(|_| protects))
    }

    /// Fills `m.masks` (`[n_head_kv][len]`, or empty when no rule applies) with the tokens to
    /// protect among `len` residual tokens of `run` from `off` on. `key_norms(g, out)` gives
    /// the key norms of those tokens in head `g` (see `store::key_norm`); it is called only
    /// when pivots are marked.
    pub(crate) fn protect_masks(
        &self,
        cfg: &CacheConfig,
        run: Run,
        off: usize,
        len: usize,
        m: &mut Masks,
        mut key_norms: impl FnMut(usize, &mut Vec<f32>),
    ) {
        let (by_saliency, pivots) = self.protection(cfg, run);
        m.masks.clear();
        if !by_saliency && pivots.is_none() {
            return;
        }
        if by_saliency {
            top_fraction(
                &self.saliency[off..off + len],
                cfg.protect_fraction,
                &mut m.order,
                &mut m.salient,
            );
        }
        for g in 0..self.heads.len() {
            let at = m.masks.len();
            if by_saliency {
                m.masks.extend_from_slice(&m.salient);
            } else {
                m.masks.resize(at + len, false);
            }
            if let Some(f) = pivots {
                key_norms(g, &mut m.norms);
                mark_pivots(&m.norms, f, &mut m.sorted, &mut m.masks[at..]);
            }
        }
    }
}

/// Protect masks of one chunk and the buffers that make them, reused across appends.
#[derive(Default)]
pub(crate) struct Masks {
    /// `[n_head_kv][len]`; empty when nothing is protected.
    pub masks: Vec<bool>,
    /// Saliency-protected tokens of the chunk (the same for every head).
    salient: Vec<bool>,
    order: Vec<usize>,
    norms: Vec<f32>,
    sorted: Vec<f32>,
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

/// ORs into `mask` the tokens whose key norm (`norms`, one per token) exceeds `factor` times
/// the median key norm: AKVQ-VL's pivots.
fn mark_pivots(norms: &[f32], factor: f32, sorted: &mut Vec<f32>, mask: &mut [bool]) {
    sorted.clear();
    sorted.extend_from_slice(norms);
    let limit = factor * median(sorted);
    for (m, &n) in mask.iter_mut().zip(norms) {
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

/// A head's blocks, wherever its bytes are.
pub(crate) trait HeadBlocks {
    fn stored(&self) -> &[Stored];
}

/// Exact bytes held by `layers`: block sizes as the formats report them, plus the f16
/// residual (two bytes per value of K and of V).
pub(crate) fn memory_report<H: HeadBlocks>(cfg: &CacheConfig, layers: &[Layer<H>]) -> MemoryReport {
    let d = cfg.head_dim;
    let mut r = MemoryReport::default();
    let (mut bytes_k, mut bytes_v, mut values) = (0u64, 0u64, 0u64);
    for lay in layers {
        values += (lay.n_tokens * cfg.n_head_kv * d) as u64;
        let res = (lay.n_res * d * 2) as u64;
        for head in &lay.heads {
            for s in head.stored() {
                r.codes += (s.k.codes + s.v.codes) as u64;
                r.meta += (s.k.meta + s.v.meta) as u64;
                bytes_k += s.k.total() as u64;
                bytes_v += s.v.total() as u64;
            }
            r.residual += 2 * res;
            bytes_k += res;
            bytes_v += res;
        }
    }
    r.total = r.codes + r.meta + r.residual;
    let bits = |b: u64| {
        if values == 0 {
            0.0
        } else {
            b as f64 * 8.0 / values as f64
        }
    };
    r.bits_k = bits(bytes_k);
    r.bits_v = bits(bytes_v);
    r
}
