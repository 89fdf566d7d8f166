//! A seeded synthetic KV cache shaped like Qwen2.5-VL-7B on a short video prompt, with the
//! statistics the KV-quantization papers report:
//!
//! - keys: per head four fixed outlier channels 5-20x larger than the rest, of fixed sign and
//!   varying by a quarter of their size from token to token (KIVI, KVQuant), in the
//!   low-frequency RoPE pairs where massive values sit in Q and K;
//! - visual tokens: a smooth content field correlated across neighbouring patches and across
//!   frames (the redundancy VidKV and video token-merging exploit); text tokens independent;
//! - an attention sink at token 0: a key far along the queries' common direction, with a
//!   small value;
//! - values: smaller, no channel outliers, driven by the same content;
//! - queries drawn like keys: the same outlier channels and signs, a text-like content; their
//!   outliers are the square root of the keys' (2-4.5x), see [`QUERY_OUTLIER_POWER`];
//! - keys and queries rotated by Qwen2-VL M-RoPE at their true positions.
//!
//! Each layer is generated from its own seed, so layers can be made on demand and in parallel.

use std::borrow::Cow;

use super::{Dims, KvSource, LayerKv, Span, dot};
use crate::Error;
use crate::kv::{HEAD_DIMS, Modality};
use crate::rng::Rng;

/// Latent content dimensions shared by the keys and values of one token.
const LATENT: usize = 32;
/// Outlier channels per KV head.
const OUTLIERS: usize = 4;
/// Outlier magnitude range, relative to an ordinary channel.
const OUTLIER_SCALE: (f32, f32) = (5.0, 20.0);
/// Token-to-token variation of an outlier channel, relative to its magnitude.
const OUTLIER_SPREAD: f32 = 0.25;
/// Share of a key's or value's variance that comes from content (the rest is noise).
const CONTENT: f32 = 0.8;
/// Spatial correlation length of the visual content, in patches.
const PATCH_CORR: f32 = 1.5;
/// Frame-to-frame correlation of the visual content.
const FRAME_CORR: f32 = 0.8;
/// A query's outlier channel is this power of the key's outlier scale. At the full scale
/// (power 1) every per-token quantization error of a key outlier reaches the score 5-20x
/// amplified, and q4_0 keys come out as bad as 2-bit KIVI, which the KIVI paper's own
/// per-token 4-bit results contradict; the square root keeps the shared channels, the
/// sink direction and the outliers' share of the scores without that.
const QUERY_OUTLIER_POWER: f32 = 0.5;
/// Standard deviation of an ordinary key, query and value channel.
const SIGMA_K: f32 = 1.0;
const SIGMA_Q: f32 = 1.0;
const SIGMA_V: f32 = 0.5;
/// How small the sink's value is.
const SINK_VALUE: f32 = 0.1;
/// Token subsampling when sizing the sink (a log-sum-exp needs no more).
const SINK_STRIDE: usize = 4;

/// The model and prompt to imitate.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Text tokens before the video.
    pub n_prompt: usize,
    pub n_frames: usize,
    /// Visual tokens per frame side after the 2x2 merge (16: 256 tokens per frame).
    pub grid: usize,
    /// Text tokens after the video, appended one at a time.
    pub n_after: usize,
    pub n_query: usize,
    pub rope_theta: f64,
    /// Rotary pairs given to the time, height and width positions (sum `head_dim / 2`).
    pub mrope_section: [usize; 3],
    pub seed: u64,
}

impl SynthConfig {
    /// Qwen2.5-VL-7B: 28 layers, 28 query and 4 KV heads of 128; 64 prompt tokens,
    /// 8 frames of 16x16 visual tokens, 32 text tokens after; 16 queries.
    pub fn qwen2_5_vl_7b(seed: u64) -> SynthConfig {
        SynthConfig {
            n_layer: 28,
            n_head: 28,
            n_head_kv: 4,
            head_dim: 128,
            n_prompt: 64,
            n_frames: 8,
            grid: 16,
            n_after: 32,
            n_query: 16,
            rope_theta: 1e6,
            mrope_section: [16, 24, 24],
            seed,
        }
    }

    pub fn n_visual(&self) -> usize {
        self.n_frames * self.grid * self.grid
    }

    pub fn n_tokens(&self) -> usize {
        self.n_prompt + self.n_visual() + self.n_after
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("synthetic KV: {m}")));
        if !HEAD_DIMS.contains(&self.head_dim) {
            return bad(format!("head dim {} not in {HEAD_DIMS:?}", self.head_dim));
        }
        if self.mrope_section.iter().sum::<usize>() != self.head_dim / 2 {
            return bad(format!(
                "M-RoPE sections {:?} must sum to head_dim / 2 = {}",
                self.mrope_section,
                self.head_dim / 2
            ));
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.n_head, self.n_head_kv
            ));
        }
        if self.n_layer == 0 || self.n_query == 0 || self.n_tokens() == 0 {
            return bad("needs at least one layer, query and token".into());
        }
        Ok(())
    }
}

/// Qwen2-VL M-RoPE positions (time, height, width) of every token and of the query:
/// text tokens count up with all three equal; a video starting at `s` puts frame `f`, row `r`,
/// column `c` at `(s + f, s + r, s + c)`; text after it resumes at one past the largest.
pub fn mrope_positions(cfg: &SynthConfig) -> (Vec<[u32; 3]>, [u32; 3]) {
    let mut pos: Vec<[u32; 3]> = (0..cfg.n_prompt as u32).map(|p| [p; 3]).collect();
    let s = cfg.n_prompt as u32;
    for f in 0..cfg.n_frames as u32 {
        for r in 0..cfg.grid as u32 {
            for c in 0..cfg.grid as u32 {
                pos.push([s + f, s + r, s + c]);
            }
        }
    }
    let mut next = pos.iter().flatten().max().map_or(0, |&m| m + 1);
    for _ in 0..cfg.n_after {
        pos.push([next; 3]);
        next += 1;
    }
    (pos, [next; 3])
}

/// The seeded synthetic source: spans and RoPE tables shared, layers made on demand.
pub struct Synth {
    cfg: SynthConfig,
    spans: Vec<Span>,
    /// `[token][pair]` cos and sin of the rotation angle; the query's after the last token.
    rope: Vec<(f32, f32)>,
    rope_q: Vec<(f32, f32)>,
}

impl Synth {
    pub fn new(cfg: SynthConfig) -> Result<Synth, Error> {
        cfg.validate()?;
        let mut spans = vec![Span {
            start: 0,
            len: cfg.n_prompt,
            modality: Modality::Text,
        }];
        let frame = cfg.grid * cfg.grid;
        spans.extend((0..cfg.n_frames).map(|f| Span {
            start: cfg.n_prompt + f * frame,
            len: frame,
            modality: Modality::Visual,
        }));
        spans.extend((0..cfg.n_after).map(|i| Span {
            start: cfg.n_prompt + cfg.n_visual() + i,
            len: 1,
            modality: Modality::Text,
        }));
        spans.retain(|s| s.len > 0);
        let (pos, pos_q) = mrope_positions(&cfg);
        let table = |p: &[u32; 3]| rope_angles(&cfg, p);
        let rope = pos.iter().flat_map(table).collect();
        let rope_q = table(&pos_q);
        Ok(Synth {
            cfg,
            spans,
            rope,
            rope_q,
        })
    }

    pub fn config(&self) -> &SynthConfig {
        &self.cfg
    }

    /// Generate one layer.
    pub fn generate(&self, layer: usize) -> LayerKv {
        let c = &self.cfg;
        let (d, hkv) = (c.head_dim, c.n_head_kv);
        let mut rng = Rng::new(c.seed ^ (layer as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
        let heads: Vec<HeadStats> = (0..hkv).map(|_| HeadStats::new(&mut rng, d)).collect();
        let latents = self.latents(&mut rng);
        let t_total = c.n_tokens();
        let mut k = vec![0f32; t_total * hkv * d];
        let mut v = vec![0f32; t_total * hkv * d];
        for t in 0..t_total {
            let lat = &latents[t * LATENT..(t + 1) * LATENT];
            let rot = &self.rope[t * d / 2..(t + 1) * d / 2];
            for (h, hs) in heads.iter().enumerate() {
                let o = (t * hkv + h) * d;
                let kz = hs.content(&hs.key_proj, lat, &mut rng);
                hs.shape_like_key(&kz, SIGMA_K, 1.0, &mut k[o..o + d]);
                rotate(&mut k[o..o + d], rot);
                let vz = hs.content(&hs.value_proj, lat, &mut rng);
                let sink = if t == 0 { SINK_VALUE } else { 1.0 };
                for (x, z) in v[o..o + d].iter_mut().zip(vz) {
                    *x = SIGMA_V * sink * z;
                }
            }
        }
        // Queries: one text-like content per query, shared by its heads; GQA groups share a
        // KV head's channel statistics.
        let group = c.n_head / hkv;
        let mut q = vec![0f32; c.n_query * c.n_head * d];
        for i in 0..c.n_query {
            let lat = rng.normals(LATENT);
            for h in 0..c.n_head {
                let hs = &heads[h / group];
                let z = hs.content(&hs.key_proj, &lat, &mut rng);
                let o = (i * c.n_head + h) * d;
                hs.shape_like_key(&z, SIGMA_Q, QUERY_OUTLIER_POWER, &mut q[o..o + d]);
                rotate(&mut q[o..o + d], &self.rope_q);
            }
        }
        for h in 0..hkv {
            self.make_sink(&mut k, &q, h);
        }
        LayerKv { k, v, q }
    }

    /// Push token 0's key of KV head `h` along the mean direction of the head's queries until
    /// its score equals the log-sum-exp of all other scores for the median query: the sink
    /// then holds about half the attention, more for some queries, less for others.
    fn make_sink(&self, k: &mut [f32], q: &[f32], h: usize) {
        let c = &self.cfg;
        let (d, hkv, group) = (c.head_dim, c.n_head_kv, c.n_head / c.n_head_kv);
        let scale = 1.0 / (d as f64).sqrt();
        let queries: Vec<&[f32]> = (0..c.n_query)
            .flat_map(|i| (h * group..(h + 1) * group).map(move |qh| (i * c.n_head + qh) * d))
            .map(|o| &q[o..o + d])
            .collect();
        let mut u = vec![0f32; d];
        for qv in &queries {
            u.iter_mut().zip(*qv).for_each(|(a, &b)| *a += b);
        }
        let norm = dot(&u, &u).sqrt();
        u.iter_mut().for_each(|x| *x /= norm);
        // Every SINK_STRIDE-th token stands in for its neighbours: enough for a log-sum-exp.
        let others: Vec<&[f32]> = (1..c.n_tokens())
            .step_by(SINK_STRIDE)
            .map(|t| &k[(t * hkv + h) * d..][..d])
            .collect();
        let weight = ((c.n_tokens() - 1) as f64 / others.len().max(1) as f64).ln();
        let k0 = &k[h * d..(h + 1) * d];
        let mut need: Vec<f64> = queries
            .iter()
            .filter_map(|qv| {
                let along = scale * dot(qv, &u) as f64;
                let s: Vec<f64> = others.iter().map(|kt| scale * dot(qv, kt) as f64).collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + s.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + weight;
                (along > 0.0).then(|| (lse - scale * dot(qv, k0) as f64) / along)
            })
            .collect();
        if need.is_empty() {
            return;
        }
        need.sort_by(f64::total_cmp);
        let beta = need[need.len() / 2].max(0.0) as f32;
        for (x, &ui) in k[h * d..(h + 1) * d].iter_mut().zip(&u) {
            *x += beta * ui;
        }
    }

    /// `[token][LATENT]` content: independent for text tokens; for video a field smoothed over
    /// the patch grid and carried from frame to frame by an AR(1) process.
    fn latents(&self, rng: &mut Rng) -> Vec<f32> {
        let c = &self.cfg;
        let mut lat = rng.normals(c.n_prompt * LATENT);
        let mut prev: Vec<f32> = Vec::new();
        for _ in 0..c.n_frames {
            let fresh = smooth_field(rng, c.grid);
            let cur: Vec<f32> = if prev.is_empty() {
                fresh
            } else {
                let keep = (1.0 - FRAME_CORR * FRAME_CORR).sqrt();
                prev.iter()
                    .zip(&fresh)
                    .map(|(&p, &f)| FRAME_CORR * p + keep * f)
                    .collect()
            };
            lat.extend_from_slice(&cur);
            prev = cur;
        }
        lat.extend(rng.normals(c.n_after * LATENT));
        lat
    }
}

impl KvSource for Synth {
    fn dims(&self) -> Dims {
        let c = &self.cfg;
        Dims {
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            n_tokens: c.n_tokens(),
            n_query: c.n_query,
        }
    }

    fn spans(&self) -> &[Span] {
        &self.spans
    }

    fn layer(&self, layer: usize) -> Cow<'_, LayerKv> {
        Cow::Owned(self.generate(layer))
    }

    fn describe(&self) -> String {
        let c = &self.cfg;
        let q = SynthConfig::qwen2_5_vl_7b(c.seed);
        let like = if (c.n_head, c.n_head_kv, c.head_dim) == (q.n_head, q.n_head_kv, q.head_dim) {
            "Qwen2.5-VL-7B-shaped "
        } else {
            ""
        };
        format!(
            "synthetic {like}KV (seed {}): {} layer{}, {} query / {} KV heads, D {}; \
             {} text + {} frames x {} visual + {} text tokens; {} queries",
            c.seed,
            c.n_layer,
            if c.n_layer == 1 { "" } else { "s" },
            c.n_head,
            c.n_head_kv,
            c.head_dim,
            c.n_prompt,
            c.n_frames,
            c.grid * c.grid,
            c.n_after,
            c.n_query
        )
    }
}

/// One KV head's fixed channel statistics and content projections.
struct HeadStats {
    /// Per channel: magnitude relative to an ordinary channel (1 for those) and sign.
    scale: Vec<f32>,
    sign: Vec<f32>,
    /// `[channel][LATENT]`, rows of unit norm so every channel's content has unit variance.
    key_proj: Vec<f32>,
    value_proj: Vec<f32>,
}

impl HeadStats {
    fn new(rng: &mut Rng, d: usize) -> HeadStats {
        let half = d / 2;
        // Outliers among the lowest-frequency rotary pairs (the top 7/16 of pair indices):
        // they barely rotate over the prompt, so they stay fixed channels after RoPE.
        let lo = half * 9 / 16;
        let mut outliers = Vec::with_capacity(OUTLIERS);
        while outliers.len() < OUTLIERS {
            let ch = lo + rng.below(half - lo) + half * rng.below(2);
            if !outliers.contains(&ch) {
                outliers.push(ch);
            }
        }
        let mut scale = vec![1f32; d];
        let mut sign = vec![0f32; d];
        for &ch in &outliers {
            scale[ch] = OUTLIER_SCALE.0 + (OUTLIER_SCALE.1 - OUTLIER_SCALE.0) * rng.uniform();
            sign[ch] = if rng.below(2) == 0 { -1.0 } else { 1.0 };
        }
        let mut proj = || {
            let mut p = rng.normals(d * LATENT);
            for row in p.chunks_exact_mut(LATENT) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter_mut().for_each(|x| *x /= norm);
            }
            p
        };
        HeadStats {
            scale,
            sign,
            key_proj: proj(),
            value_proj: proj(),
        }
    }

    /// Unit-variance channels: projected content plus independent noise.
    fn content(&self, proj: &[f32], lat: &[f32], rng: &mut Rng) -> Vec<f32> {
        let (a, noise) = (CONTENT.sqrt(), (1.0 - CONTENT).sqrt());
        proj.chunks_exact(LATENT)
            .map(|row| {
                let c: f32 = row.iter().zip(lat).map(|(p, l)| p * l).sum();
                a * c + noise * rng.normal()
            })
            .collect()
    }

    /// Ordinary channels `sigma * z`; outlier channels `sigma * scale^power` times their sign
    /// plus a little of `z`.
    fn shape_like_key(&self, z: &[f32], sigma: f32, outlier_power: f32, out: &mut [f32]) {
        for (c, (o, &z)) in out.iter_mut().zip(z).enumerate() {
            *o = if self.sign[c] == 0.0 {
                sigma * z
            } else {
                sigma * self.scale[c].powf(outlier_power) * (self.sign[c] + OUTLIER_SPREAD * z)
            };
        }
    }
}

/// Per rotary pair `j` (channels `j` and `j + D/2`, the NeoX layout Qwen uses), the cos and
/// sin of `position[section(j)] * theta^(-2j/D)`.
fn rope_angles(cfg: &SynthConfig, pos: &[u32; 3]) -> Vec<(f32, f32)> {
    let half = cfg.head_dim / 2;
    let [s_t, s_h, _] = cfg.mrope_section;
    (0..half)
        .map(|j| {
            let axis = if j < s_t {
                0
            } else if j < s_t + s_h {
                1
            } else {
                2
            };
            let freq = cfg.rope_theta.powf(-2.0 * j as f64 / cfg.head_dim as f64);
            let (s, c) = (pos[axis] as f64 * freq).sin_cos();
            (c as f32, s as f32)
        })
        .collect()
}

/// Rotate the pairs `(x[j], x[j + D/2])` by the angles of `rot`.
fn rotate(x: &mut [f32], rot: &[(f32, f32)]) {
    let half = rot.len();
    for (j, &(c, s)) in rot.iter().enumerate() {
        let (a, b) = (x[j], x[j + half]);
        x[j] = a * c - b * s;
        x[j + half] = a * s + b * c;
    }
}

/// `[row][col][LATENT]` white noise blurred by a Gaussian of `PATCH_CORR` patches, each point
/// rescaled to unit variance (fewer taps reach the borders).
fn smooth_field(rng: &mut Rng, g: usize) -> Vec<f32> {
    let radius = (3.0 * PATCH_CORR).ceil() as isize;
    let w: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * PATCH_CORR * PATCH_CORR)).exp())
        .collect();
    let w = &w;
    // The taps of position `p` that fall inside the grid: (position, weight).
    let taps = |p: usize| {
        (-radius..=radius).filter_map(move |k| {
            let q = p as isize + k;
            (0..g as isize)
                .contains(&q)
                .then(|| (q as usize, w[(k + radius) as usize]))
        })
    };
    let energy: Vec<f32> = (0..g).map(|p| taps(p).map(|(_, x)| x * x).sum()).collect();
    let white = rng.normals(g * g * LATENT);
    let at = |r: usize, c: usize| (r * g + c) * LATENT..(r * g + c + 1) * LATENT;
    // Separable: blur along each row, then along each column.
    let mut rows = vec![0f32; white.len()];
    let mut both = vec![0f32; white.len()];
    for r in 0..g {
        for c in 0..g {
            for (q, x) in taps(c) {
                let src = &white[at(r, q)];
                rows[at(r, c)]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(o, &s)| *o += x * s);
            }
        }
    }
    for r in 0..g {
        for c in 0..g {
            for (q, x) in taps(r) {
                let src = &rows[at(q, c)];
                both[at(r, c)]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(o, &s)| *o += x * s);
            }
            let norm = (energy[r] * energy[c]).sqrt();
            both[at(r, c)].iter_mut().for_each(|o| *o /= norm);
        }
    }
    both
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> SynthConfig {
        SynthConfig {
            n_layer: 2,
            n_frames: 2,
            n_query: 4,
            ..SynthConfig::qwen2_5_vl_7b(seed)
        }
    }

    #[test]
    fn qwen_positions_follow_qwen2_vl() {
        let cfg = SynthConfig::qwen2_5_vl_7b(0);
        let (pos, q) = mrope_positions(&cfg);
        assert_eq!(pos.len(), 64 + 8 * 256 + 32);
        assert_eq!(pos[63], [63; 3]);
        // Frame 0 starts at the next text position; frame f row r col c at 64 + (f, r, c).
        assert_eq!(pos[64], [64; 3]);
        assert_eq!(pos[64 + 3 * 256 + 5 * 16 + 7], [67, 69, 71]);
        assert_eq!(pos[64 + 8 * 256 - 1], [71, 79, 79]);
        // Text resumes one past the largest visual position (64 + 15).
        assert_eq!(pos[64 + 8 * 256], [80; 3]);
        assert_eq!(q, [112; 3]);
    }

    #[test]
    fn rope_matches_the_formula() {
        let cfg = SynthConfig::qwen2_5_vl_7b(0);
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        let x = rng.normals(128);
        let pos = [3u32, 700, 41];
        let mut y = x.clone();
        rotate(&mut y, &rope_angles(&cfg, &pos));
        for j in 0..64 {
            let p = if j < 16 {
                pos[0]
            } else if j < 40 {
                pos[1]
            } else {
                pos[2]
            };
            let a = p as f64 / 1e6f64.powf(j as f64 / 64.0);
            let (xa, xb) = (x[j] as f64, x[j + 64] as f64);
            assert!((y[j] as f64 - (xa * a.cos() - xb * a.sin())).abs() < 1e-5);
            assert!((y[j + 64] as f64 - (xb * a.cos() + xa * a.sin())).abs() < 1e-5);
        }
    }

    #[test]
    fn spans_cover_the_tokens_in_order() {
        let s = Synth::new(SynthConfig::qwen2_5_vl_7b(0)).unwrap();
        let spans = s.spans();
        assert_eq!(spans.len(), 1 + 8 + 32);
        let mut next = 0;
        for sp in spans {
            assert_eq!(sp.start, next);
            next += sp.len;
        }
        assert_eq!(next, 2144);
        assert!(spans[1..9].iter().all(|s| s.modality == Modality::Visual));
        assert!(spans[9..].iter().all(|s| s.len == 1));
    }

    #[test]
    fn smooth_field_has_unit_variance_and_local_correlation() {
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        // Enough draws that the estimates sit several standard errors inside the bounds.
        let (g, draws) = (16, 256);
        let mut var = vec![0f64; g * g];
        let (mut near, mut far) = (0f64, 0f64);
        for _ in 0..draws {
            let f = smooth_field(&mut rng, g);
            let x = |r: usize, c: usize, l: usize| f[(r * g + c) * LATENT + l] as f64;
            for (p, v) in var.iter_mut().enumerate() {
                for l in 0..LATENT {
                    *v += x(p / g, p % g, l).powi(2) / (draws * LATENT) as f64;
                }
            }
            for l in 0..LATENT {
                near += x(5, 5, l) * x(5, 6, l);
                far += x(5, 5, l) * x(5, 13, l);
            }
        }
        let n = (draws * LATENT) as f64;
        let (near, far) = (near / n, far / n);
        // Interior and border points alike: the rescaling accounts for missing taps.
        for (p, &v) in var.iter().enumerate() {
            assert!((0.8..1.25).contains(&v), "point {p}: variance {v}");
        }
        // Neighbours at distance 1 correlate as exp(-1 / (4 PATCH_CORR^2)) = 0.89.
        let want = (-1.0 / (4.0 * (PATCH_CORR as f64).powi(2))).exp();
        assert!((near - want).abs() < 0.08, "near {near} want {want}");
        assert!(far.abs() < 0.1, "far {far}");
    }

    #[test]
    fn same_seed_same_data() {
        let tiny = |seed| SynthConfig {
            n_prompt: 8,
            n_frames: 2,
            grid: 4,
            n_after: 3,
            n_query: 2,
            ..small(seed)
        };
        let a = Synth::new(tiny(7)).unwrap();
        let b = Synth::new(tiny(7)).unwrap();
        let c = Synth::new(tiny(8)).unwrap();
        assert_eq!(a.generate(1).k, b.generate(1).k);
        assert_ne!(a.generate(1).k, c.generate(1).k);
        assert_ne!(a.generate(0).k, a.generate(1).k);
    }

    /// Pre-RoPE statistics are what the papers describe, but the cache sees post-RoPE keys;
    /// the outliers sit in slowly rotating pairs, so they must survive RoPE.
    #[test]
    fn key_outlier_channels_are_5_to_20x_and_fixed_per_head() {
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let s = Synth::new(small(seed)).unwrap();
        let (d, hkv, t) = (128, 4, s.config().n_tokens());
        let l = s.generate(0);
        for h in 0..hkv {
            // Mean |k| per channel over tokens 1.. (token 0 is the sink).
            let mut mag = vec![0f64; d];
            for tok in 1..t {
                for (c, m) in mag.iter_mut().enumerate() {
                    *m += (l.k[(tok * hkv + h) * d + c] as f64).abs() / (t - 1) as f64;
                }
            }
            let mut sorted = mag.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[d / 2];
            let big: Vec<usize> = (0..d).filter(|&c| mag[c] > 3.0 * median).collect();
            assert_eq!(big.len(), OUTLIERS, "head {h}: {mag:?}");
            for &c in &big {
                // |N(0,1)| has mean 0.8: an outlier of scale s has mean |k| ≈ s.
                let ratio = mag[c] / median;
                assert!((4.0..=30.0).contains(&ratio), "head {h} ch {c}: {ratio}");
                // Fixed: the sign agrees on nearly every token.
                let pos = (1..t)
                    .filter(|&tok| l.k[(tok * hkv + h) * d + c] > 0.0)
                    .count();
                let agree = pos.max(t - 1 - pos) as f64 / (t - 1) as f64;
                assert!(agree > 0.99, "head {h} ch {c}: sign agreement {agree}");
            }
            // Values have no such channels.
            let mut vmag = vec![0f64; d];
            for tok in 1..t {
                for (c, m) in vmag.iter_mut().enumerate() {
                    *m += (l.v[(tok * hkv + h) * d + c] as f64).abs();
                }
            }
            let vmax = vmag.iter().cloned().fold(0.0, f64::max);
            let vmin = vmag.iter().cloned().fold(f64::INFINITY, f64::min);
            assert!(vmax < 3.0 * vmin, "head {h}: value channels {vmin}..{vmax}");
        }
    }

    fn corr(a: &[f32], b: &[f32]) -> f64 {
        let dot = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(&p, &q)| p as f64 * q as f64)
                .sum::<f64>()
        };
        dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
    }

    #[test]
    fn visual_values_correlate_with_neighbours_not_far_patches() {
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let s = Synth::new(small(seed)).unwrap();
        let l = s.generate(1);
        let row = 128 * 4;
        let tok = |f: usize, r: usize, c: usize| {
            let t = 64 + f * 256 + r * 16 + c;
            &l.v[t * row..(t + 1) * row]
        };
        let (mut near, mut next_frame, mut far, mut text) = (0.0, 0.0, 0.0, 0.0);
        let mut n = 0.0;
        for f in 0..1 {
            for r in 2..13 {
                for c in 2..13 {
                    near += corr(tok(f, r, c), tok(f, r, c + 1));
                    next_frame += corr(tok(f, r, c), tok(f + 1, r, c));
                    far += corr(tok(f, r, c), tok(f, (r + 8) % 16, (c + 8) % 16)).abs();
                    n += 1.0;
                }
            }
        }
        for t in 1..63 {
            text += corr(
                &l.v[t * row..(t + 1) * row],
                &l.v[(t + 1) * row..(t + 2) * row],
            )
            .abs();
        }
        let (near, next_frame, far, text) = (near / n, next_frame / n, far / n, text / 62.0);
        println!("near {near:.3} next frame {next_frame:.3} far {far:.3} text {text:.3}");
        assert!(near > 0.5, "{near}");
        assert!(next_frame > 0.4, "{next_frame}");
        assert!(far < 0.25, "{far}");
        assert!(text < 0.25, "{text}");
    }

    #[test]
    fn the_sink_draws_most_queries() {
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let s = Synth::new(small(seed)).unwrap();
        let c = s.config().clone();
        let (d, hkv, t) = (c.head_dim, c.n_head_kv, c.n_tokens());
        let scale = 1.0 / (d as f32).sqrt();
        let l = s.generate(0);
        let (mut top, mut mass, mut eff, mut n) = (0, 0.0, 0.0, 0);
        for i in 0..c.n_query {
            for h in 0..c.n_head {
                let q = &l.q[(i * c.n_head + h) * d..][..d];
                let g = h / (c.n_head / hkv);
                let sc: Vec<f32> = (0..t)
                    .map(|tok| {
                        let k = &l.k[(tok * hkv + g) * d..][..d];
                        scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>()
                    })
                    .collect();
                let lp = super::super::metrics::softmax(&sc).log_p;
                let p0 = lp[0].exp();
                mass += p0;
                top += (lp.iter().cloned().fold(f64::NEG_INFINITY, f64::max) == lp[0]) as usize;
                // Effective support exp(entropy) of the non-sink attention.
                let rest: f64 = 1.0 - p0;
                let h_rest: f64 = lp[1..]
                    .iter()
                    .map(|&x| {
                        let p = x.exp() / rest;
                        if p > 0.0 { -p * p.ln() } else { 0.0 }
                    })
                    .sum();
                eff += h_rest.exp();
                n += 1;
            }
        }
        let (frac, mass, eff) = (top as f64 / n as f64, mass / n as f64, eff / n as f64);
        println!(
            "sink is the top token for {frac:.2} of queries, mass {mass:.3}, support {eff:.0}"
        );
        // Most queries; fresh seeds land around 0.7-0.9 (0.68 seen once), so the bar is a majority.
        assert!(frac > 0.5, "{frac}");
        assert!((0.1..0.8).contains(&mass), "{mass}");
        // Attention is neither uniform nor on a single token.
        assert!((10.0..t as f64 / 2.0).contains(&eff), "{eff}");
    }
}
