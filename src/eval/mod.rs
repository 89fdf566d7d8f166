//! `kvbits eval`: fidelity and memory of cache types on synthetic ([`synth`]) or dumped
//! ([`npy`]) KV, against the f16 cache.
//!
//! Each layer is evaluated in its own one-layer cache: a [`CacheConfig`] treats every layer
//! alike and the cache stores layers independently, so this measures the same as one cache
//! of `n_layer` layers, while layers are generated on demand and run in parallel.
//!
//! Attention is measured on what each cache stores (`dequantize_f32`): scores `q·k̂ / sqrt(D)`,
//! which is what every format's `scores` returns from its codes, and output `softmax · v̂`,
//! which is what `attention_decode` returns. Computed here in vectorized passes, this takes
//! seconds where the formats' scalar reference scoring takes minutes. Only configs that
//! calibrate scores (CalibQuant) go through the cache's `attention_scores`.
//! `tests/eval.rs` checks every row against the cache's own `attention_decode` and
//! `attention_scores`.

pub mod metrics;
pub mod npy;
pub mod plot;
pub mod synth;

use std::borrow::Cow;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::Error;
use crate::kv::simd::dot;
use crate::kv::{Applies, BlockTokens, CacheConfig, FormatId, HEAD_DIMS, KvCache, Modality, Rows};
use metrics::Nmse;

/// Attention overlap is measured on this many top tokens.
pub const TOP_K: usize = 32;

/// Shape of the data to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n_layer: usize,
    /// Query heads (GQA: a multiple of `n_head_kv`).
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_tokens: usize,
    pub n_query: usize,
}

/// Tokens appended to the cache in one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
    pub modality: Modality,
}

/// One layer's data: `k` and `v` `[n_tokens][n_head_kv][head_dim]`, `q`
/// `[n_query][n_head][head_dim]`, all after RoPE, as a runtime would hand them over.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub q: Vec<f32>,
}

/// Where the KV to evaluate comes from.
pub trait KvSource: Sync {
    fn dims(&self) -> Dims;
    /// Append calls in order, covering `0..n_tokens`.
    fn spans(&self) -> &[Span];
    fn layer(&self, layer: usize) -> Cow<'_, LayerKv>;
    /// One line saying what the data is, for the table header.
    fn describe(&self) -> String;
}

/// One row of the evaluation: a cache type pair or a preset.
#[derive(Clone, Debug, PartialEq)]
pub enum RowSpec {
    /// The same K and V type for every token, everything quantized (the residual flushed),
    /// so the row measures the types' own cost.
    Pair { k: FormatId, v: FormatId },
    /// A preset as deployed, f16 residual included.
    Preset(String),
}

impl RowSpec {
    /// A type on its own: for both roles, or paired with f16 on the role it does not handle.
    pub fn for_type(f: FormatId) -> RowSpec {
        match f.info().applies {
            Applies::Both => RowSpec::Pair { k: f, v: f },
            Applies::Keys => RowSpec::Pair {
                k: f,
                v: FormatId::F16,
            },
            Applies::Values => RowSpec::Pair {
                k: FormatId::F16,
                v: f,
            },
        }
    }

    /// Every cache type, then every preset.
    pub fn all() -> Vec<RowSpec> {
        let types = FormatId::ALL.into_iter().map(RowSpec::for_type);
        let presets = CacheConfig::PRESETS.map(|p| RowSpec::Preset(p.to_string()));
        types.chain(presets).collect()
    }

    /// `q4_0`, `k1_5_mix/f16` (K type / V type when they differ), `preset:vidkv`.
    pub fn name(&self) -> String {
        match self {
            RowSpec::Pair { k, v } if k == v => k.name().to_string(),
            RowSpec::Pair { k, v } => format!("{k}/{v}"),
            RowSpec::Preset(p) => format!("preset:{p}"),
        }
    }

    fn config(&self, d: &Dims, block_tokens: Option<BlockTokens>) -> Result<CacheConfig, Error> {
        let mut cfg = match self {
            RowSpec::Pair { k, v } => CacheConfig::pair(*k, *v, 1, d.n_head_kv, d.head_dim),
            RowSpec::Preset(p) => CacheConfig::preset(p, 1, d.n_head_kv, d.head_dim)?,
        };
        if let Some(b) = block_tokens {
            cfg.block_tokens = b;
        }
        Ok(cfg)
    }
}

/// One row of the results; the field names are those of `--json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub name: String,
    /// Effective bits per K value: all K bytes stored over K values stored.
    pub bits_k: f64,
    pub bits_v: f64,
    /// Reconstruction `Σ(a-b)²/Σb²` per layer and KV head, averaged.
    pub nmse_k: f64,
    pub nmse_v: f64,
    /// Decode-attention output against the f16 cache's, per query and head, averaged.
    pub nmse_out: f64,
    /// `KL(p_f16 || p)` of the attention distributions, averaged.
    pub kl: f64,
    /// `|top32(p_f16) ∩ top32(p)| / 32`, averaged.
    pub top32: f64,
}

/// The saliency handed to the cache with each visual span: a token's key L2 norm averaged
/// over KV heads. A runtime has it at append time without extra work, a dump without the
/// prompt's queries has it too, and large keys are the ones that draw large scores.
pub fn saliency(k: &[f32], n_head_kv: usize, head_dim: usize) -> Vec<f32> {
    k.chunks_exact(n_head_kv * head_dim)
        .map(|tok| {
            let norms: f32 = tok
                .chunks_exact(head_dim)
                .map(|h| h.iter().map(|x| x * x).sum::<f32>().sqrt())
                .sum();
            norms / n_head_kv as f32
        })
        .collect()
}

/// Evaluate `specs` on every layer of `src`; `block_tokens` overrides the configs' own.
pub fn evaluate(
    src: &dyn KvSource,
    specs: &[RowSpec],
    block_tokens: Option<BlockTokens>,
) -> Result<Vec<Row>, Error> {
    let d = src.dims();
    check_dims(&d)?;
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    // Reject a bad row (a type in the wrong role, an unknown preset, a block size out of
    // range) before spending time on the data.
    for s in specs {
        s.config(&d, block_tokens)?.validate()?;
    }
    let per_layer = (0..d.n_layer)
        .into_par_iter()
        .map(|l| eval_layer(src, l, specs, block_tokens))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut sum = Acc::default();
            per_layer.iter().for_each(|l| sum.merge(&l[i]));
            sum.row(s.name(), d.n_layer)
        })
        .collect())
}

/// What the cache cannot check: the query side. (Head dims are the cache's to check.)
fn check_dims(d: &Dims) -> Result<(), Error> {
    if d.n_head_kv == 0 || !d.n_head.is_multiple_of(d.n_head_kv) {
        return Err(Error::InvalidArgument(format!(
            "{} query heads are not a multiple of {} KV heads",
            d.n_head, d.n_head_kv
        )));
    }
    if d.n_layer == 0 || d.n_tokens == 0 || d.n_query == 0 {
        return Err(Error::InvalidArgument(
            "nothing to evaluate: no layers, tokens or queries".into(),
        ));
    }
    Ok(())
}

/// Sums over layers (bits), layer-heads (reconstruction) and layer-query-heads (attention).
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    bits_k: f64,
    bits_v: f64,
    nmse_k: f64,
    nmse_v: f64,
    n_kv: usize,
    nmse_out: f64,
    kl: f64,
    top: f64,
    n_att: usize,
}

impl Acc {
    fn merge(&mut self, o: &Acc) {
        self.bits_k += o.bits_k;
        self.bits_v += o.bits_v;
        self.nmse_k += o.nmse_k;
        self.nmse_v += o.nmse_v;
        self.n_kv += o.n_kv;
        self.nmse_out += o.nmse_out;
        self.kl += o.kl;
        self.top += o.top;
        self.n_att += o.n_att;
    }

    /// Every layer holds the same number of values, so the mean of the layers' bits is the
    /// bits of the whole cache.
    fn row(self, name: String, n_layer: usize) -> Row {
        let (kv, att) = (self.n_kv as f64, self.n_att as f64);
        Row {
            name,
            bits_k: self.bits_k / n_layer as f64,
            bits_v: self.bits_v / n_layer as f64,
            nmse_k: self.nmse_k / kv,
            nmse_v: self.nmse_v / kv,
            nmse_out: self.nmse_out / att,
            kl: self.kl / att,
            top32: self.top / att,
        }
    }
}

/// The f16 cache's attention for every query and head of one layer, `[n_query][n_head]`.
struct Reference {
    out: Vec<f32>,
    dist: Vec<metrics::Softmax>,
    top: Vec<Vec<usize>>,
}

fn eval_layer(
    src: &dyn KvSource,
    layer: usize,
    specs: &[RowSpec],
    block_tokens: Option<BlockTokens>,
) -> Result<Vec<Acc>, Error> {
    let d = src.dims();
    let data = src.layer(layer);
    let sal = saliency(&data.k, d.n_head_kv, d.head_dim);
    let build = |spec: &RowSpec| -> Result<KvCache, Error> {
        let mut cache = KvCache::new(spec.config(&d, block_tokens)?)?;
        let row = d.n_head_kv * d.head_dim;
        for s in src.spans() {
            let r = s.start * row..(s.start + s.len) * row;
            let sal = (s.modality == Modality::Visual).then(|| &sal[s.start..s.start + s.len]);
            cache.append(
                0,
                Rows::F32(&data.k[r.clone()]),
                Rows::F32(&data.v[r]),
                s.len,
                s.modality,
                sal,
            )?;
        }
        if let RowSpec::Pair { .. } = spec {
            cache.flush();
        }
        Ok(cache)
    };
    let f16 = Stored::new(&build(&RowSpec::for_type(FormatId::F16))?, &d)?;
    let (mut out, mut dist, mut top) = (Vec::new(), Vec::new(), Vec::new());
    for q in data.q.chunks_exact(d.n_head * d.head_dim) {
        let scores = f16.scores(q, &d);
        for (h, s) in scores.chunks_exact(d.n_tokens).enumerate() {
            let sm = metrics::softmax(s);
            out.extend(f16.output(&sm.p, h / (d.n_head / d.n_head_kv), &d));
            dist.push(sm);
            top.push(metrics::top_k(s, TOP_K));
        }
    }
    let reference = Reference { out, dist, top };
    specs
        .par_iter()
        .map(|spec| measure(&build(spec)?, &data, &reference, &d))
        .collect()
}

/// K and V exactly as a cache holds them (`dequantize_f32`), per KV head `[n_tokens][head_dim]`.
struct Stored {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Stored {
    fn new(cache: &KvCache, d: &Dims) -> Result<Stored, Error> {
        let n = d.n_tokens * d.n_head_kv * d.head_dim;
        let (mut k, mut v) = (vec![0f32; n], vec![0f32; n]);
        cache.dequantize_f32(0, 0, d.n_tokens, &mut k, &mut v)?;
        let per_head =
            |x: &[f32]| -> Vec<Vec<f32>> { (0..d.n_head_kv).map(|g| head_rows(x, g, d)).collect() };
        Ok(Stored {
            k: per_head(&k),
            v: per_head(&v),
        })
    }

    /// `scale · q·k̂_t` of one query `[n_head][head_dim]`, `[n_head][n_tokens]`: what every
    /// format's `scores` computes from its codes.
    fn scores(&self, q: &[f32], d: &Dims) -> Vec<f32> {
        let scale = scale(d);
        let group = d.n_head / d.n_head_kv;
        let mut s = Vec::with_capacity(d.n_head * d.n_tokens);
        for (h, qh) in q.chunks_exact(d.head_dim).enumerate() {
            let k = &self.k[h / group];
            s.extend(k.chunks_exact(d.head_dim).map(|kt| scale * dot(qh, kt)));
        }
        s
    }

    /// Attention output `Σ_t p_t v̂_t` of one head over KV head `g`.
    fn output(&self, p: &[f32], g: usize, d: &Dims) -> Vec<f32> {
        let mut out = vec![0f32; d.head_dim];
        for (&pt, vt) in p.iter().zip(self.v[g].chunks_exact(d.head_dim)) {
            out.iter_mut().zip(vt).for_each(|(o, &x)| *o += pt * x);
        }
        out
    }
}

/// The softmax scale of every evaluation, `1 / sqrt(D)`.
fn scale(d: &Dims) -> f32 {
    1.0 / (d.head_dim as f32).sqrt()
}

/// The rows of KV head `g` of `[n_tokens][n_head_kv][head_dim]` data, `[n_tokens][head_dim]`.
fn head_rows(x: &[f32], g: usize, d: &Dims) -> Vec<f32> {
    let mut out = Vec::with_capacity(d.n_tokens * d.head_dim);
    for t in x.chunks_exact(d.n_head_kv * d.head_dim) {
        out.extend_from_slice(&t[g * d.head_dim..][..d.head_dim]);
    }
    out
}

/// One row on one layer (see the module doc for how attention is computed).
fn measure(cache: &KvCache, data: &LayerKv, r: &Reference, d: &Dims) -> Result<Acc, Error> {
    let mem = cache.memory();
    let mut acc = Acc {
        bits_k: mem.bits_k,
        bits_v: mem.bits_v,
        n_kv: d.n_head_kv,
        ..Acc::default()
    };
    let st = Stored::new(cache, d)?;
    let hd = d.head_dim;
    for g in 0..d.n_head_kv {
        let (mut ek, mut ev) = (Nmse::default(), Nmse::default());
        let (k, v) = (head_rows(&data.k, g, d), head_rows(&data.v, g, d));
        k.iter().zip(&st.k[g]).for_each(|(&b, &a)| ek.add(a, b));
        v.iter().zip(&st.v[g]).for_each(|(&b, &a)| ev.add(a, b));
        acc.nmse_k += ek.value();
        acc.nmse_v += ev.value();
    }
    let calibrated = cache.config().calibrate;
    let group = d.n_head / d.n_head_kv;
    for (i, q) in data.q.chunks_exact(d.n_head * hd).enumerate() {
        let scores = if calibrated {
            cache.attention_scores(0, q, d.n_head, scale(d))?
        } else {
            st.scores(q, d)
        };
        for (h, s) in scores.chunks_exact(d.n_tokens).enumerate() {
            let j = i * d.n_head + h;
            let sm = metrics::softmax(s);
            let out = st.output(&sm.p, h / group, d);
            acc.nmse_out += metrics::nmse(&out, &r.out[j * hd..][..hd]);
            acc.kl += metrics::kl(&r.dist[j], &sm);
            let top = metrics::overlap(&metrics::top_k(s, TOP_K), &r.top[j]);
            acc.top += top as f64 / r.top[j].len() as f64;
            acc.n_att += 1;
        }
    }
    Ok(acc)
}

/// Dumped KV of one layer: `K.npy` and `V.npy` `[T][n_head_kv][D]`, `Q.npy`
/// `[n_q][n_head][D]`; tokens `visual` are visual, the rest text.
pub struct NpySource {
    dims: Dims,
    spans: Vec<Span>,
    data: LayerKv,
    what: String,
}

impl NpySource {
    pub fn open(
        k: &Path,
        v: &Path,
        q: &Path,
        visual: Option<(usize, usize)>,
    ) -> Result<NpySource, Error> {
        let (ka, va, qa) = (npy::read(k)?, npy::read(v)?, npy::read(q)?);
        let bad = |m: String| Err(Error::InvalidArgument(m));
        for (p, a, what) in [
            (k, &ka, "[T][n_head_kv][D]"),
            (v, &va, "[T][n_head_kv][D]"),
            (q, &qa, "[n_q][n_head][D]"),
        ] {
            if a.shape.len() != 3 || a.shape.contains(&0) {
                return bad(format!(
                    "{}: shape {:?}, expected three non-zero dimensions {what}",
                    p.display(),
                    a.shape
                ));
            }
        }
        if ka.shape != va.shape {
            return bad(format!(
                "{} has shape {:?} but {} has {:?}: K and V must match",
                k.display(),
                ka.shape,
                v.display(),
                va.shape
            ));
        }
        let (t, hkv, hd) = (ka.shape[0], ka.shape[1], ka.shape[2]);
        let (n_q, n_head, qd) = (qa.shape[0], qa.shape[1], qa.shape[2]);
        if qd != hd {
            return bad(format!(
                "{} has head dim {qd} but {} has {hd}",
                q.display(),
                k.display()
            ));
        }
        if !HEAD_DIMS.contains(&hd) {
            return Err(Error::Unsupported(format!(
                "{}: head dim {hd} (supported: {HEAD_DIMS:?})",
                k.display()
            )));
        }
        if n_head % hkv != 0 {
            return bad(format!(
                "{} has {n_head} query heads, not a multiple of the {hkv} KV heads of {}",
                q.display(),
                k.display()
            ));
        }
        let (a, b) = visual.unwrap_or((0, t));
        if a >= b || b > t {
            return bad(format!(
                "--visual {a}:{b} must satisfy START < END <= T = {t} (tokens of {})",
                k.display()
            ));
        }
        let span = |start, end, modality| Span {
            start,
            len: end - start,
            modality,
        };
        let spans: Vec<Span> = [
            span(0, a, Modality::Text),
            span(a, b, Modality::Visual),
            span(b, t, Modality::Text),
        ]
        .into_iter()
        .filter(|s| s.len > 0)
        .collect();
        let what = format!(
            "{}, {}, {}: {t} tokens ({} visual), {n_head} query / {hkv} KV heads, D {hd}; \
             {n_q} queries",
            k.display(),
            v.display(),
            q.display(),
            b - a
        );
        Ok(NpySource {
            dims: Dims {
                n_layer: 1,
                n_head,
                n_head_kv: hkv,
                head_dim: hd,
                n_tokens: t,
                n_query: n_q,
            },
            spans,
            data: LayerKv {
                k: ka.data,
                v: va.data,
                q: qa.data,
            },
            what,
        })
    }
}

impl KvSource for NpySource {
    fn dims(&self) -> Dims {
        self.dims
    }

    fn spans(&self) -> &[Span] {
        &self.spans
    }

    fn layer(&self, _layer: usize) -> Cow<'_, LayerKv> {
        Cow::Borrowed(&self.data)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn row_names_and_default_rows() {
        let rows = RowSpec::all();
        let names: Vec<String> = rows.iter().map(RowSpec::name).collect();
        assert_eq!(
            names,
            [
                "f16",
                "q8_0",
                "q4_0",
                "kivi2",
                "q1_calib",
                "k1_5_mix/f16",
                "f16/v1_58_tern",
                "q2_had",
                "q4_had",
                "preset:calibquant",
                "preset:vidkv",
                "preset:akvq",
                "preset:kivi2"
            ]
        );
    }

    #[test]
    fn saliency_is_mean_head_key_norm() {
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        let (t, hkv, hd) = (5, 3, 64);
        let k = rng.normals(t * hkv * hd);
        let s = saliency(&k, hkv, hd);
        for (tok, &st) in s.iter().enumerate() {
            let mut want = 0f64;
            for h in 0..hkv {
                let x = &k[(tok * hkv + h) * hd..][..hd];
                want += x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            }
            want /= hkv as f64;
            assert!((st as f64 - want).abs() < 1e-5 * want, "{st} {want}");
        }
    }
}
