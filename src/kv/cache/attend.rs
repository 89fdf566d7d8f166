//! Attention over the cache: per query head, the blocks then the residual, folded into one
//! online softmax (running max, running sum, rescaled accumulator).
//!
//! Scores come from [`Format::scores`](crate::kv::Format::scores), values from
//! [`Format::accumulate`](crate::kv::Format::accumulate): nothing is dequantized. A visual
//! span whose keys are q1_calib with `calibrate` on is one unit: its scores must all be known
//! before CalibQuant's calibration can map them.
//!
//! Decode takes the fast path (`decode` below): the kernels of `kv::simd`, threads over
//! (KV head, chunk of tokens) items, merged in a fixed order. Prefill and `attention_scores`
//! stay on the reference walk, which the fast path is tested against.

use half::f16;
use rayon::prelude::*;

use super::{KvCache, Layer, Modality};
use crate::Error;
use crate::kv::simd::softmax::{self, exp_shifted, min_max};
use crate::kv::simd::{self, Isa};
use crate::kv::{FormatId, Role, Shape};

/// Tokens of one KV head stored together: a block, or (part of) the f16 residual.
#[derive(Clone, Copy)]
struct Seg<'a> {
    first: usize,
    n: usize,
    k: FormatId,
    kb: &'a [u8],
    v: FormatId,
    vb: &'a [u8],
    /// The span, when its scores are calibrated together.
    calib: Option<usize>,
}

impl Seg<'_> {
    fn end(&self) -> usize {
        self.first + self.n
    }
}

/// One query head's pass: query `q` (one head) against KV head `g`, tokens `0..end`.
struct Pass<'q> {
    g: usize,
    q: &'q [f32],
    scale: f32,
    end: usize,
}

/// Buffers of one attention call.
struct Work<'a> {
    /// Scores, then weights, of the unit being folded in.
    sc: Vec<f32>,
    unit: Vec<Seg<'a>>,
}

/// Softmax state of one query head, folded unit by unit.
struct Online {
    max: f32,
    sum: f32,
}

impl Online {
    fn new() -> Online {
        Online {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }

    /// Turns `x` (logits) into weights against the new running max, rescaling the sum and
    /// the accumulator `acc` of what came before.
    fn fold(&mut self, x: &mut [f32], acc: &mut [f32]) {
        let m = x.iter().fold(self.max, |a, &b| a.max(b));
        if m > self.max {
            let r = (self.max - m).exp();
            self.sum *= r;
            acc.iter_mut().for_each(|a| *a *= r);
            self.max = m;
        }
        let mut sum = 0.0;
        for w in x {
            *w = (*w - m).exp();
            sum += *w;
        }
        self.sum += sum;
    }
}

/// CalibQuant: maps a span's logits from `[m, M]` onto `[m, M - δ]`, keeping their order;
/// a span whose range is at most `δ` is left as it is.
fn calibrate(x: &mut [f32], delta: f32) {
    let (lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    softmax::calibrate(x, lo, hi, delta, Isa::Scalar);
}

fn shape(n: usize, d: usize, role: Role) -> Shape {
    Shape { n, d, role }
}

impl KvCache {
    /// Softmax attention of one new token: `q` and `out` are `[n_head][head_dim]`.
    /// Query head `h` reads KV head `h / (n_head / n_head_kv)`.
    pub fn attention_decode(
        &self,
        layer: usize,
        q: &[f32],
        n_head: usize,
        out: &mut [f32],
        scale: f32,
    ) -> Result<(), Error> {
        self.attention_decode_on(layer, q, n_head, out, scale, simd::isa())
    }

    /// [`KvCache::attention_decode`] on a chosen CPU path (tests and benchmarks compare
    /// them); `Unsupported` where this CPU lacks it.
    pub fn attention_decode_on(
        &self,
        layer: usize,
        q: &[f32],
        n_head: usize,
        out: &mut [f32],
        scale: f32,
        isa: Isa,
    ) -> Result<(), Error> {
        if !isa.supported() {
            return Err(Error::Unsupported(format!(
                "the {isa} CPU path on this CPU (it has {})",
                Isa::best()
            )));
        }
        let lay = self.check_query(layer, q, 1, n_head, scale)?;
        self.check_out(out, n_head)?;
        self.decode(lay, q, n_head, out, scale, isa);
        Ok(())
    }

    /// Causal attention of the last `n_q` cached tokens: `q` and `out` are `[n_q][n_head][head_dim]`;
    /// query `i` sees cached tokens `0..=n_tokens - n_q + i`.
    pub fn attention_prefill(
        &self,
        layer: usize,
        q: &[f32],
        n_q: usize,
        n_head: usize,
        out: &mut [f32],
        scale: f32,
    ) -> Result<(), Error> {
        let lay = self.check_query(layer, q, n_q, n_head, scale)?;
        if n_q == 0 || n_q > lay.n_tokens {
            return Err(Error::InvalidArgument(format!(
                "prefill of {n_q} queries over {} cached tokens: need 1..={}",
                lay.n_tokens, lay.n_tokens
            )));
        }
        self.check_out(out, n_q * n_head)?;
        self.attend(lay, q, n_q, n_head, out, scale);
        Ok(())
    }

    /// Scores (logits after `scale` and calibration) of one query `[n_head][head_dim]` against
    /// every cached token, `[n_head][n_tokens]` in token order: what softmax is taken over.
    pub fn attention_scores(
        &self,
        layer: usize,
        q: &[f32],
        n_head: usize,
        scale: f32,
    ) -> Result<Vec<f32>, Error> {
        let lay = self.check_query(layer, q, 1, n_head, scale)?;
        let (n, d) = (lay.n_tokens, self.cfg.head_dim);
        let group = n_head / self.cfg.n_head_kv;
        let mut all = vec![0f32; n_head * n];
        let mut w = self.work(lay);
        for (h, row) in all.chunks_exact_mut(n).enumerate() {
            let pass = Pass {
                g: h / group,
                q: &q[h * d..(h + 1) * d],
                scale,
                end: n,
            };
            self.walk(lay, &pass, &mut w, |sc, vis, unit| {
                row[unit[0].first..][..vis].copy_from_slice(&sc[..vis]);
            });
        }
        Ok(all)
    }

    /// Tokens `first..first + n` of `layer` as f16 rows `[n][n_head_kv][head_dim]`.
    pub fn dequantize(
        &self,
        layer: usize,
        first: usize,
        n: usize,
        k: &mut [f16],
        v: &mut [f16],
    ) -> Result<(), Error> {
        self.dequantize_into(layer, first, n, k, v, f16::from_f32)
    }

    /// [`KvCache::dequantize`] without rounding the reconstruction to f16: exactly the
    /// values attention uses.
    pub fn dequantize_f32(
        &self,
        layer: usize,
        first: usize,
        n: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), Error> {
        self.dequantize_into(layer, first, n, k, v, |x| x)
    }

    fn dequantize_into<T>(
        &self,
        layer: usize,
        first: usize,
        n: usize,
        k: &mut [T],
        v: &mut [T],
        conv: impl Fn(f32) -> T,
    ) -> Result<(), Error> {
        let lay = self.layer(layer)?;
        let (hk, d) = (self.cfg.n_head_kv, self.cfg.head_dim);
        let end = first
            .checked_add(n)
            .filter(|&e| e <= lay.n_tokens)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "tokens {first}..{first}+{n} out of range: layer {layer} has {} tokens",
                    lay.n_tokens
                ))
            })?;
        for (name, len) in [("K", k.len()), ("V", v.len())] {
            if len != n * hk * d {
                return Err(Error::InvalidArgument(format!(
                    "{name} output: {n} tokens x {hk} KV heads x {d} dims need {} values, got {len}",
                    n * hk * d
                )));
            }
        }
        let mut buf = Vec::new();
        for g in 0..hk {
            for s in self.segs(lay, g, end).filter(|s| s.end() > first) {
                for (f, bytes, role, out) in [
                    (s.k, s.kb, Role::Key, &mut *k),
                    (s.v, s.vb, Role::Value, &mut *v),
                ] {
                    buf.resize(s.n * d, 0.0);
                    f.imp().dequantize(bytes, shape(s.n, d, role), &mut buf);
                    for t in s.first.max(first)..s.end().min(end) {
                        let src = &buf[(t - s.first) * d..][..d];
                        let dst = &mut out[((t - first) * hk + g) * d..][..d];
                        dst.iter_mut().zip(src).for_each(|(o, &x)| *o = conv(x));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_query(
        &self,
        layer: usize,
        q: &[f32],
        n_q: usize,
        n_head: usize,
        scale: f32,
    ) -> Result<&Layer, Error> {
        let lay = self.layer(layer)?;
        let (hk, d) = (self.cfg.n_head_kv, self.cfg.head_dim);
        if n_head == 0 || !n_head.is_multiple_of(hk) {
            return Err(Error::InvalidArgument(format!(
                "{n_head} query heads: must be a positive multiple of the {hk} KV heads"
            )));
        }
        if q.len() != n_q * n_head * d {
            return Err(Error::InvalidArgument(format!(
                "queries: {n_q} x {n_head} heads x {d} dims need {} values, got {}",
                n_q * n_head * d,
                q.len()
            )));
        }
        if lay.n_tokens == 0 {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} has no cached tokens to attend to"
            )));
        }
        if !scale.is_finite() || q.iter().any(|x| !x.is_finite()) {
            return Err(Error::InvalidArgument(
                "queries and scale must be finite".into(),
            ));
        }
        Ok(lay)
    }

    fn check_out(&self, out: &[f32], rows: usize) -> Result<(), Error> {
        let want = rows * self.cfg.head_dim;
        if out.len() != want {
            return Err(Error::InvalidArgument(format!(
                "attention output needs {want} values, got {}",
                out.len()
            )));
        }
        Ok(())
    }

    fn work<'a>(&self, lay: &Layer) -> Work<'a> {
        Work {
            sc: vec![0.0; lay.n_tokens],
            unit: Vec::new(),
        }
    }

    /// Attention of the last `n_q` tokens' queries (validated), causal.
    fn attend(
        &self,
        lay: &Layer,
        q: &[f32],
        n_q: usize,
        n_head: usize,
        out: &mut [f32],
        scale: f32,
    ) {
        let d = self.cfg.head_dim;
        let group = n_head / self.cfg.n_head_kv;
        let mut w = self.work(lay);
        let mut part = vec![0f32; d];
        for (r, (qh, acc)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let (i, h) = (r / n_head, r % n_head);
            let pass = Pass {
                g: h / group,
                q: qh,
                scale,
                end: lay.n_tokens - n_q + i + 1,
            };
            acc.fill(0.0);
            let mut sm = Online::new();
            self.walk(lay, &pass, &mut w, |sc, vis, unit| {
                sm.fold(&mut sc[..vis], acc);
                // Tokens of the last block past `end` must not count.
                sc[vis..].fill(0.0);
                // Summed per segment, then into the total: rounding error grows with the
                // square root of a block's length plus that of the number of blocks, rather
                // than of the context's length.
                let mut off = 0;
                for s in unit {
                    part.fill(0.0);
                    s.v.imp().accumulate(
                        s.vb,
                        shape(s.n, d, Role::Value),
                        &sc[off..off + s.n],
                        &mut part,
                    );
                    acc.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
                    off += s.n;
                }
            });
            let inv = 1.0 / sm.sum;
            acc.iter_mut().for_each(|a| *a *= inv);
        }
    }

    /// One query head's pass. For each unit (a block, a
    /// calibrated span, or the residual), in token order, calls `visit(sc, vis, unit)`:
    /// `sc[..vis]` the final logits of the unit's visible tokens, `sc` as long as the unit.
    fn walk<'a>(
        &'a self,
        lay: &'a Layer,
        p: &Pass<'_>,
        w: &mut Work<'a>,
        mut visit: impl FnMut(&mut [f32], usize, &[Seg<'a>]),
    ) {
        let d = self.cfg.head_dim;
        let mut segs = self.segs(lay, p.g, p.end).peekable();
        while let Some(s0) = segs.next() {
            w.unit.clear();
            w.unit.push(s0);
            if let Some(span) = s0.calib {
                while let Some(s) = segs.next_if(|s| s.calib == Some(span)) {
                    w.unit.push(s);
                }
            }
            let mut off = 0;
            for s in &w.unit {
                s.k.imp().scores(
                    s.kb,
                    shape(s.n, d, Role::Key),
                    p.q,
                    &mut w.sc[off..off + s.n],
                );
                off += s.n;
            }
            let vis = off.min(p.end - s0.first);
            let logits = &mut w.sc[..vis];
            logits.iter_mut().for_each(|x| *x *= p.scale);
            if s0.calib.is_some() {
                calibrate(logits, self.cfg.calib_delta);
            }
            visit(&mut w.sc[..off], vis, &w.unit);
        }
    }

    /// The blocks of KV head `g` that start before `end`, then the residual up to `end`.
    fn segs<'a>(&'a self, lay: &'a Layer, g: usize, end: usize) -> impl Iterator<Item = Seg<'a>> {
        let head = &lay.heads[g];
        let d = self.cfg.head_dim;
        let calibrate = self.cfg.calibrate;
        let blocks = lay
            .blocks
            .iter()
            .zip(&head.at)
            .take_while(move |(b, _)| b.first < end)
            .map(move |(b, a)| Seg {
                first: b.first,
                n: b.n_tokens,
                k: b.k,
                kb: &head.k[a.k_off..a.k_off + a.k.total()],
                v: b.v,
                vb: &head.v[a.v_off..a.v_off + a.v.total()],
                calib: (calibrate && b.modality == Modality::Visual && b.k == FormatId::Q1Calib)
                    .then_some(b.span),
            });
        let first = lay.n_tokens - lay.n_res;
        let f16 = FormatId::F16;
        // The residual is token-major f16: its first tokens are an f16 block of their own.
        let res = (end > first).then(|| {
            let n = end.min(lay.n_tokens) - first;
            Seg {
                first,
                n,
                k: f16,
                kb: &head.k_res[..n * d * 2],
                v: f16,
                vb: &head.v_res[..n * d * 2],
                calib: None,
            }
        });
        blocks.chain(res)
    }
}

/// Tokens per work item of the threaded decode (whole segments, so a long block is one item).
/// Fixed, never derived from the thread count: the result does not depend on scheduling.
const CHUNK_TOKENS: usize = 1024;

/// One work item of the threaded decode: KV head `g`, segments `segs` (of every head's list:
/// heads share the block plan), `len` tokens.
struct Item {
    g: usize,
    segs: std::ops::Range<usize>,
    len: usize,
}

/// A calibrated span's logit range seen by one item: `(head in group, span, min, max)`.
type Piece = (usize, usize, f32, f32);

/// What an item leaves for the merge, per head of its group: the max logit, the sum of
/// `exp(x − max)` and the unnormalised output `[group][d]`.
struct Part {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    /// Logits of one decode call, `[item][head in group][token]`; kept to spare the page faults
    /// of a fresh buffer of megabytes per step.
    static LOGITS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl KvCache {
    /// Decode attention of one query per head: items `(KV head, chunk)` in parallel, every
    /// query head of a KV head served by one read of each block; each item folds its own
    /// softmax, and the items merge in order. A calibrated span needs its range before any of
    /// its logits can be used: then the scores of all items come first, the range of each
    /// span is reduced, and the items finish.
    fn decode(&self, lay: &Layer, q: &[f32], n_head: usize, out: &mut [f32], scale: f32, isa: Isa) {
        let (hk, d, n) = (self.cfg.n_head_kv, self.cfg.head_dim, lay.n_tokens);
        let group = n_head / hk;
        let segs: Vec<Vec<Seg>> = (0..hk).map(|g| self.segs(lay, g, n).collect()).collect();
        let mut chunks = Vec::new();
        let mut i = 0;
        while i < segs[0].len() {
            let start = i;
            let mut len = 0;
            while i < segs[0].len() && (len == 0 || len + segs[0][i].n <= CHUNK_TOKENS) {
                len += segs[0][i].n;
                i += 1;
            }
            chunks.push((start..i, len));
        }
        let items: Vec<Item> = (0..hk)
            .flat_map(|g| {
                chunks.iter().map(move |(r, len)| Item {
                    g,
                    segs: r.clone(),
                    len: *len,
                })
            })
            .collect();
        let calibrated = segs[0].iter().any(|s| s.calib.is_some());
        // The scale folded into the queries once: scores come out as logits.
        let q: Vec<f32> = q.iter().map(|&x| x * scale).collect();
        let qg = |g: usize| &q[g * group * d..(g + 1) * group * d];

        let parts: Vec<Part> = LOGITS.with_borrow_mut(|buf| {
            buf.resize(n_head * n, 0.0);
            let mut rest = &mut buf[..];
            let mut logits = Vec::with_capacity(items.len());
            for it in &items {
                let (a, b) = rest.split_at_mut(group * it.len);
                logits.push(a);
                rest = b;
            }
            let work = items.par_iter().zip(logits.par_iter_mut());
            if !calibrated {
                return work
                    .map(|(it, sc)| {
                        self.item_scores(it, &segs[it.g], qg(it.g), sc, isa);
                        self.item_sums(it, &segs[it.g], sc, group, &[], &[], isa)
                    })
                    .collect();
            }
            let pieces: Vec<Vec<Piece>> = work
                .map(|(it, sc)| self.item_scores(it, &segs[it.g], qg(it.g), sc, isa))
                .collect();
            // Range of every (KV head, head in group, span): min and max are exact in any order.
            let n_spans = lay.n_spans;
            let mut range = vec![(f32::INFINITY, f32::NEG_INFINITY); hk * group * n_spans];
            for (it, ps) in items.iter().zip(&pieces) {
                for &(hh, span, lo, hi) in ps {
                    let r = &mut range[(it.g * group + hh) * n_spans + span];
                    *r = (r.0.min(lo), r.1.max(hi));
                }
            }
            items
                .par_iter()
                .zip(logits.par_iter_mut())
                .zip(&pieces)
                .map(|((it, sc), ps)| {
                    let r = &range[it.g * group * n_spans..(it.g + 1) * group * n_spans];
                    self.item_sums(it, &segs[it.g], sc, group, r, ps, isa)
                })
                .collect()
        });

        // Merge in item order: per head, rescale every item to the largest max.
        for (g, parts) in parts.chunks_exact(chunks.len()).enumerate() {
            for hh in 0..group {
                let m = parts
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, p| a.max(p.max[hh]));
                let o = &mut out[(g * group + hh) * d..][..d];
                o.fill(0.0);
                let mut total = 0.0;
                for p in parts {
                    let r = (p.max[hh] - m).exp();
                    total += r * p.sum[hh];
                    for (o, &a) in o.iter_mut().zip(&p.acc[hh * d..(hh + 1) * d]) {
                        *o += r * a;
                    }
                }
                let inv = 1.0 / total;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }

    /// Logits of an item (queries `q` scaled) into `sc` (`[head in group][it.len]`); returns
    /// the logit range of every calibrated span piece it holds.
    fn item_scores(
        &self,
        it: &Item,
        segs: &[Seg<'_>],
        q: &[f32],
        sc: &mut [f32],
        isa: Isa,
    ) -> Vec<Piece> {
        let d = self.cfg.head_dim;
        let group = q.len() / d;
        let mut off = 0;
        for s in &segs[it.segs.clone()] {
            let shape = shape(s.n, d, Role::Key);
            simd::kernel(s.k, isa).scores(s.kb, shape, q, &mut sc[off..], it.len);
            off += s.n;
        }
        let mut pieces = Vec::new();
        let mut off = 0;
        for s in &segs[it.segs.clone()] {
            if let Some(span) = s.calib {
                for hh in 0..group {
                    let (lo, hi) = min_max(&sc[hh * it.len + off..][..s.n], isa);
                    pieces.push((hh, span, lo, hi));
                }
            }
            off += s.n;
        }
        pieces
    }

    /// Softmax weights and the weighted values of an item whose logits are in `sc`;
    /// `range[hh * n_spans + span]` is the logit range of each calibrated span, `pieces` the
    /// item's own ranges ([`KvCache::item_scores`]).
    #[allow(clippy::too_many_arguments)]
    fn item_sums(
        &self,
        it: &Item,
        segs: &[Seg<'_>],
        sc: &mut [f32],
        group: usize,
        range: &[(f32, f32)],
        pieces: &[Piece],
        isa: Isa,
    ) -> Part {
        let d = self.cfg.head_dim;
        let delta = self.cfg.calib_delta;
        let n_spans = range.len() / group.max(1);
        let (mut max, mut sum) = (vec![0f32; group], vec![0f32; group]);
        let item = &segs[it.segs.clone()];
        // An item inside one span (any item of a long visual span): its calibration is one
        // affine map with a positive slope `a`, which the exponent takes, `exp(a·(x − max x))`,
        // from the raw maximum its pieces already hold, instead of a pass that rewrites the
        // logits and another for their maximum.
        let one_span = item[0]
            .calib
            .filter(|&span| item.iter().all(|s| s.calib == Some(span)));
        if let Some(span) = one_span {
            for hh in 0..group {
                let (lo, hi) = range[hh * n_spans + span];
                let a = softmax::calibration_slope(lo, hi, delta);
                let m = pieces
                    .iter()
                    .filter(|p| p.0 == hh)
                    .fold(f32::NEG_INFINITY, |m, p| m.max(p.3));
                let x = &mut sc[hh * it.len..(hh + 1) * it.len];
                sum[hh] = softmax::exp_scaled(x, a, m, isa);
                max[hh] = lo + (m - lo) * a;
            }
        } else {
            let mut off = 0;
            for s in item {
                if let Some(span) = s.calib {
                    for hh in 0..group {
                        let (lo, hi) = range[hh * n_spans + span];
                        let x = &mut sc[hh * it.len + off..][..s.n];
                        softmax::calibrate(x, lo, hi, delta, isa);
                    }
                }
                off += s.n;
            }
            for hh in 0..group {
                (max[hh], sum[hh]) = exp_shifted(&mut sc[hh * it.len..(hh + 1) * it.len], isa);
            }
        }
        let mut acc = vec![0f32; group * d];
        let mut off = 0;
        for s in &segs[it.segs.clone()] {
            let shape = shape(s.n, d, Role::Value);
            simd::kernel(s.v, isa).accumulate(s.vb, shape, &sc[off..], it.len, &mut acc);
            off += s.n;
        }
        Part { max, sum, acc }
    }
}
