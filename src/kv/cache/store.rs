//! Appending: validate, push into the f16 residual, then quantize what has aged out of it
//! (which tokens, and when, is the ledger's rule: `ledger.rs`).

use super::{CacheConfig, Chunk, Head, KvCache, Layer, Mark, Masks, Modality, Rows, Run, Stored};
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
    /// Protected tokens of the chunk being quantized.
    masks: Masks,
    /// Offset and size of the block being stored, per head: K, and the role in progress.
    k_sizes: Vec<(usize, BlockSize)>,
    sizes: Vec<(usize, BlockSize)>,
    chunks: Vec<Chunk>,
    arenas: Vec<(usize, usize)>,
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
    fn rewind(&mut self, m: Mark, d: usize) {
        for h in &mut self.heads {
            h.k_res.truncate(m.n_res * d * 2);
            h.v_res.truncate(m.n_res * d * 2);
        }
        self.rewind_ledger(m);
    }

    /// Adds validated rows to the residual.
    fn push(
        &mut self,
        k: Rows<'_>,
        v: Rows<'_>,
        n: usize,
        modality: Modality,
        saliency: Option<&[f32]>,
        d: usize,
    ) {
        self.push_runs(n, modality, saliency);
        let h = self.heads.len();
        for (g, head) in self.heads.iter_mut().enumerate() {
            for t in 0..n {
                k.push_row(t, g, h, d, &mut head.k_res);
                v.push_row(t, g, h, d, &mut head.v_res);
            }
        }
    }
}

/// Quantizes the residual runs that are due (all of them when `force`). Either every due
/// chunk is stored and leaves the residual, or nothing changes.
fn flush(cfg: &CacheConfig, lay: &mut Layer, s: &mut Scratch, force: bool) -> Result<(), Error> {
    lay.due_chunks(cfg, force, &mut s.chunks);
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

    let bytes = lay.retire(&s.chunks) * cfg.head_dim * 2;
    for h in &mut lay.heads {
        h.k_res.drain(..bytes);
        h.v_res.drain(..bytes);
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
    let b0 = lay.plan_blocks(cfg, run, off, len);
    let (kf, vf) = cfg.formats(run.modality);
    let first = lay.blocks[b0].first;
    let d = cfg.head_dim;
    let x = &mut s.x;
    lay.protect_masks(cfg, run, off, len, &mut s.masks, |g, norms| {
        let keys = &lay.heads[g].k_res[off * d * 2..(off + len) * d * 2];
        x.resize(len * d, 0.0);
        f16s_to_f32(keys, x);
        norms.clear();
        norms.extend(x.chunks_exact(d).map(key_norm));
    });
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
    let masks = &s.masks.masks;
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

/// The Euclidean norm of a key row, summed in channel order (the device cache sums the same
/// way, so both find the same pivots).
pub(crate) fn key_norm(row: &[f32]) -> f32 {
    row.iter().map(|x| x * x).sum::<f32>().sqrt()
}
