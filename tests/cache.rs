//! `KvCache` against attention written here from the formulas, on fresh random inputs (the
//! seed is printed: replay a failure by putting it in place of `Rng::fresh_seed()`).

use half::f16;
use kvbits::Error;
use kvbits::kv::cache::Block;
use kvbits::kv::{
    Applies, BlockSize, BlockTokens, CacheConfig, FormatId, KvCache, Modality, QuantParams, Role,
    Rows, Shape,
};
use kvbits::rng::{Rng, rel_err};
use std::ops::Range;

use Modality::{Text, Visual};

fn rng(test: &str) -> Rng {
    let seed = Rng::fresh_seed();
    eprintln!("{test}: seed {seed}");
    Rng::new(seed)
}

/// One append of the test's script, made in every layer.
#[derive(Clone, Copy, Debug)]
struct Step {
    n: usize,
    modality: Modality,
    /// Appended one token per call.
    drip: bool,
}

const fn text(n: usize) -> Step {
    Step {
        n,
        modality: Text,
        drip: false,
    }
}

const fn visual(n: usize) -> Step {
    Step {
        n,
        modality: Visual,
        drip: false,
    }
}

const fn drip(n: usize) -> Step {
    Step {
        n,
        modality: Text,
        drip: true,
    }
}

/// What the script appends, rounded to f16 as the cache holds it: per layer `[t][hk][d]`.
struct Seq {
    hk: usize,
    d: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    saliency: Vec<f32>,
}

fn f16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

/// Random K and V for `n` tokens; keys have one channel in eight `wide` times wider, as real
/// keys have outlier channels (the quantizers' hard case).
fn seq(cfg: &CacheConfig, n: usize, wide: f32, r: &mut Rng) -> Seq {
    let (hk, d) = (cfg.n_head_kv, cfg.head_dim);
    let key = |r: &mut Rng| -> Vec<f32> {
        let w: Vec<f32> = (0..d)
            .map(|_| if r.below(8) == 0 { wide } else { 1.0 })
            .collect();
        let x: Vec<f32> = (0..n * hk * d).map(|i| r.normal() * w[i % d]).collect();
        f16_round(&x)
    };
    let k = (0..cfg.n_layer).map(|_| key(r)).collect();
    let v = (0..cfg.n_layer)
        .map(|_| f16_round(&r.normals(n * hk * d)))
        .collect();
    Seq {
        hk,
        d,
        k,
        v,
        saliency: (0..n).map(|_| r.uniform()).collect(),
    }
}

fn total(steps: &[Step]) -> usize {
    steps.iter().map(|s| s.n).sum()
}

/// Appends the script's tokens in `range` (a prefix of what is not yet appended), layer by
/// layer as a model does; visual appends carry saliency when `salient`.
fn fill(cache: &mut KvCache, s: &Seq, steps: &[Step], range: Range<usize>, salient: bool) {
    let row = s.hk * s.d;
    let mut t0 = 0;
    for st in steps {
        let (a, b) = (t0.max(range.start), (t0 + st.n).min(range.end));
        t0 += st.n;
        if a >= b {
            continue;
        }
        let calls: Vec<(usize, usize)> = if st.drip {
            (a..b).map(|t| (t, 1)).collect()
        } else {
            vec![(a, b - a)]
        };
        for (a, m) in calls {
            for l in 0..cache.config().n_layer {
                let sal = (salient && st.modality == Visual).then(|| &s.saliency[a..a + m]);
                cache
                    .append(
                        l,
                        Rows::F32(&s.k[l][a * row..(a + m) * row]),
                        Rows::F32(&s.v[l][a * row..(a + m) * row]),
                        m,
                        st.modality,
                        sal,
                    )
                    .unwrap();
            }
        }
    }
}

/// Token ranges of the script's visual spans.
fn visual_spans(steps: &[Step]) -> Vec<(usize, usize)> {
    let mut t = 0;
    let mut out = vec![];
    for st in steps {
        if st.modality == Visual {
            out.push((t, t + st.n));
        }
        t += st.n;
    }
    out
}

/// CalibQuant's calibration, written from the formula, over each span's tokens below
/// `logits.len()`.
fn calibrate_ref(logits: &mut [f64], spans: &[(usize, usize)], delta: f64) {
    for &(a, b) in spans {
        let b = b.min(logits.len());
        if a >= b {
            continue;
        }
        let x = &mut logits[a..b];
        let m = x.iter().copied().fold(f64::INFINITY, f64::min);
        let mx = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if mx - m > delta {
            x.iter_mut()
                .for_each(|a| *a = m + (*a - m) * (mx - m - delta) / (mx - m));
        }
    }
}

/// softmax(q·Kᵀ·scale)·V over tokens `0..end` of `[t][hk][d]` rows, GQA; `fix` edits each
/// head's logits before the softmax. Logits are f32 dot products as any f32 attention computes
/// them (their rounding, amplified by the softmax, is what an f32 cache cannot avoid); the
/// rest in f64. Returns (logits `[n_head][end]`, out `[n_head][d]`).
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    end: usize,
    hk: usize,
    d: usize,
    n_head: usize,
    scale: f32,
    fix: &dyn Fn(&mut [f64]),
) -> (Vec<f32>, Vec<f32>) {
    let (mut logits, mut out) = (vec![], vec![]);
    for h in 0..n_head {
        let g = h / (n_head / hk);
        let qh = &q[h * d..(h + 1) * d];
        let mut a: Vec<f64> = (0..end)
            .map(|t| {
                let kt = &k[(t * hk + g) * d..][..d];
                let dot: f32 = qh.iter().zip(kt).map(|(&x, &y)| x * y).sum();
                (dot * scale) as f64
            })
            .collect();
        fix(&mut a);
        let m = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = a.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = w.iter().sum();
        for c in 0..d {
            let o: f64 = (0..end)
                .map(|t| w[t] * v[(t * hk + g) * d + c] as f64)
                .sum();
            out.push((o / sum) as f32);
        }
        logits.extend(a.iter().map(|&x| x as f32));
    }
    (logits, out)
}

fn no_fix(_: &mut [f64]) {}

/// Layer `l`'s K and V as the cache reconstructs them, `[t][hk][d]`.
fn dequantized(cache: &KvCache, l: usize) -> (Vec<f32>, Vec<f32>) {
    let c = cache.config();
    let n = cache.n_tokens(l);
    let mut k = vec![0f32; n * c.n_head_kv * c.head_dim];
    let mut v = k.clone();
    cache.dequantize_f32(l, 0, n, &mut k, &mut v).unwrap();
    (k, v)
}

fn decode(cache: &KvCache, l: usize, q: &[f32], n_head: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    cache
        .attention_decode(l, q, n_head, &mut out, scale)
        .unwrap();
    out
}

fn f16_pair(n_layer: usize, hk: usize, d: usize, block: usize) -> CacheConfig {
    CacheConfig {
        block_tokens: BlockTokens::Fixed(block),
        ..CacheConfig::pair(FormatId::F16, FormatId::F16, n_layer, hk, d)
    }
}

fn check_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

#[test]
fn f16_cache_equals_plain_softmax_attention() {
    let mut r = rng("f16_cache_equals_plain_softmax_attention");
    let steps = [text(50), visual(70), text(40), drip(7), visual(33), drip(5)];
    for d in [64, 80, 128] {
        let cfg = f16_pair(2, 2, d, 32);
        let s = seq(&cfg, total(&steps), 1.0, &mut r);
        let mut cache = KvCache::new(cfg).unwrap();
        fill(&mut cache, &s, &steps, 0..usize::MAX, false);
        assert!(
            cache.n_residual(0) > 0,
            "the script must leave tokens in the residual"
        );
        assert!(cache.blocks(0).len() > 3);
        let n_head = 6;
        let scale = 1.0 / (d as f32).sqrt();
        for l in 0..2 {
            let q: Vec<f32> = r.normals(n_head * d);
            let n = cache.n_tokens(l);
            let (logits, want) = reference(&q, &s.k[l], &s.v[l], n, 2, d, n_head, scale, &no_fix);
            check_close(
                &format!("d {d} layer {l} attention"),
                &decode(&cache, l, &q, n_head, scale),
                &want,
                1e-6,
            );
            let got = cache.attention_scores(l, &q, n_head, scale).unwrap();
            check_close(&format!("d {d} layer {l} scores"), &got, &logits, 1e-6);
            // An f16 cache reconstructs exactly what was appended.
            let (k, v) = dequantized(&cache, l);
            assert_eq!(k, s.k[l]);
            assert_eq!(v, s.v[l]);
        }
    }
}

/// Formats whose reconstruction of a token does not depend on the other tokens of its block.
const PER_TOKEN: [FormatId; 4] = [
    FormatId::F16,
    FormatId::Q8_0,
    FormatId::Q4_0,
    FormatId::Q2Had,
];

fn per_token_pair(f: FormatId, n_layer: usize, hk: usize, d: usize, block: usize) -> CacheConfig {
    CacheConfig {
        block_tokens: BlockTokens::Fixed(block),
        ..CacheConfig::pair(f, f, n_layer, hk, d)
    }
}

#[test]
fn prefill_equals_reference_per_query_and_decode_on_prefixes() {
    let mut r = rng("prefill_equals_reference_per_query_and_decode_on_prefixes");
    let steps = [text(40), visual(50), text(30), drip(3)];
    let n = total(&steps);
    let (d, hk, n_head, n_q) = (80, 2, 4, 16);
    for f in PER_TOKEN {
        let cfg = per_token_pair(f, 1, hk, d, 32);
        let s = seq(&cfg, n, 4.0, &mut r);
        let mut cache = KvCache::new(cfg.clone()).unwrap();
        fill(&mut cache, &s, &steps, 0..n, false);
        let scale = 0.11;
        let q = r.normals(n_q * n_head * d);
        let prefill = |c: &KvCache| {
            let mut out = vec![0f32; q.len()];
            c.attention_prefill(0, &q, n_q, n_head, &mut out, scale)
                .unwrap();
            out
        };
        let tol = if f == FormatId::F16 { 1e-6 } else { 1e-5 };
        let (k, v) = dequantized(&cache, 0);
        let out = prefill(&cache);
        let rows = n_head * d;
        for i in 0..n_q {
            let end = n - n_q + i + 1;
            let qi = &q[i * rows..(i + 1) * rows];
            let (_, want) = reference(qi, &k, &v, end, hk, d, n_head, scale, &no_fix);
            check_close(
                &format!("{f} query {i}"),
                &out[i * rows..(i + 1) * rows],
                &want,
                tol,
            );
        }
        // Each query as a decode step over a cache holding only its prefix. Quantized or
        // in the residual, a token reads differently: quantize everything in both.
        cache.flush();
        let out = prefill(&cache);
        for i in 0..n_q {
            let end = n - n_q + i + 1;
            let mut prefix = KvCache::new(cfg.clone()).unwrap();
            fill(&mut prefix, &s, &steps, 0..end, false);
            prefix.flush();
            check_close(
                &format!("{f} query {i} vs decode"),
                &out[i * rows..(i + 1) * rows],
                &decode(&prefix, 0, &q[i * rows..(i + 1) * rows], n_head, scale),
                // Decode takes the fast path (its own summation order, vector exp): the bar
                // every fast path meets against the reference walk.
                1e-5,
            );
        }
    }
}

#[test]
fn text_in_one_call_or_token_by_token_makes_the_same_blocks() {
    let mut r = rng("text_in_one_call_or_token_by_token_makes_the_same_blocks");
    let one = [text(75), visual(40), text(70)];
    let many = [drip(75), visual(40), drip(70)];
    for (f, recent) in PER_TOKEN.iter().flat_map(|&f| [(f, 0), (f, 20)]) {
        let cfg = CacheConfig {
            recent_f16: recent,
            ..per_token_pair(f, 2, 2, 64, 32)
        };
        let s = seq(&cfg, total(&one), 4.0, &mut r);
        let mut a = KvCache::new(cfg.clone()).unwrap();
        let mut b = KvCache::new(cfg).unwrap();
        fill(&mut a, &s, &one, 0..usize::MAX, false);
        fill(&mut b, &s, &many, 0..usize::MAX, false);
        for l in 0..2 {
            assert_eq!(a.blocks(l), b.blocks(l), "{f}");
            assert_eq!(a.n_residual(l), b.n_residual(l));
            let q = r.normals(4 * 64);
            check_close(
                &format!("{f}, last {recent} f16: attention"),
                &decode(&a, l, &q, 4, 0.125),
                &decode(&b, l, &q, 4, 0.125),
                1e-6,
            );
        }
        assert_eq!(a.memory(), b.memory());
    }
}

#[test]
fn blocks_follow_spans_and_the_residual_rule() {
    let blk = |first, n_tokens, span, modality| Block {
        first,
        n_tokens,
        span,
        modality,
        k: FormatId::F16,
        v: FormatId::F16,
    };
    let mut r = rng("blocks_follow_spans_and_the_residual_rule");
    let cfg = f16_pair(1, 1, 64, 32);
    // 70 text: two full blocks, 6 wait; a visual span closes the text span (its 6 become a
    // partial block) and is quantized at once; 40 more text tokens: one full block, 8 wait.
    let steps = [drip(70), visual(45), text(40)];
    let s = seq(&cfg, total(&steps), 1.0, &mut r);
    let mut c = KvCache::new(cfg.clone()).unwrap();
    fill(&mut c, &s, &steps, 0..usize::MAX, false);
    let want = vec![
        blk(0, 32, 0, Text),
        blk(32, 32, 0, Text),
        blk(64, 6, 0, Text),
        blk(70, 32, 1, Visual),
        blk(102, 13, 1, Visual),
        blk(115, 32, 2, Text),
    ];
    assert_eq!(c.blocks(0), want.as_slice());
    assert_eq!(c.n_residual(0), 8);
    // flush() quantizes the rest as a partial block and ends the text span; two visual
    // appends in a row are two spans.
    c.flush();
    assert_eq!(c.n_residual(0), 0);
    let (k3, v3) = (&s.k[0][..64 * 3], &s.v[0][..64 * 3]);
    c.append(0, Rows::F32(k3), Rows::F32(v3), 3, Text, None)
        .unwrap();
    assert_eq!(c.n_residual(0), 3);
    c.flush();
    for _ in 0..2 {
        c.append(0, Rows::F32(k3), Rows::F32(v3), 3, Visual, None)
            .unwrap();
    }
    assert_eq!(
        &c.blocks(0)[6..],
        &[
            blk(147, 8, 2, Text),
            blk(155, 3, 3, Text),
            blk(158, 3, 4, Visual),
            blk(161, 3, 5, Visual)
        ]
    );

    // With the last 50 tokens kept f16, a visual span is quantized in full blocks as it ages,
    // its partial block once all of it is old.
    let cfg = CacheConfig {
        recent_f16: 50,
        ..cfg
    };
    let mut c = KvCache::new(cfg).unwrap();
    fill(&mut c, &s, &[visual(100)], 0..100, false);
    assert_eq!(c.blocks(0), &[blk(0, 32, 0, Visual)]);
    assert_eq!(c.n_residual(0), 68);
    // 49 text tokens age two more full blocks; the 4 left wait until all of them are old.
    fill(&mut c, &s, &[visual(100), text(50)], 100..149, false);
    let aged = [
        blk(0, 32, 0, Visual),
        blk(32, 32, 0, Visual),
        blk(64, 32, 0, Visual),
    ];
    assert_eq!(c.blocks(0), &aged);
    assert_eq!(c.n_residual(0), 53);
    fill(&mut c, &s, &[visual(100), text(50)], 149..150, false);
    assert_eq!(&c.blocks(0)[3..], &[blk(96, 4, 0, Visual)]);
    assert_eq!(c.n_residual(0), 50);
}

#[test]
fn block_tokens_all_makes_one_block_per_span() {
    let mut r = rng("block_tokens_all_makes_one_block_per_span");
    let cfg = CacheConfig {
        block_tokens: BlockTokens::All,
        ..f16_pair(1, 1, 64, 32)
    };
    let steps = [drip(300), visual(500), text(20)];
    let s = seq(&cfg, total(&steps), 1.0, &mut r);
    let mut c = KvCache::new(cfg).unwrap();
    fill(&mut c, &s, &steps, 0..usize::MAX, false);
    let plan: Vec<(usize, usize)> = c.blocks(0).iter().map(|b| (b.first, b.n_tokens)).collect();
    assert_eq!(plan, [(0, 300), (300, 500)]);
    assert_eq!(c.n_residual(0), 20);
}

/// Bytes the cache should hold, from the blocks the test expects: (codes, meta, K bytes,
/// V bytes) of every KV head of every layer.
fn plan_bytes(plan: &[(usize, FormatId, FormatId, usize)], d: usize, heads: usize) -> [usize; 4] {
    let mut sum = [0; 4];
    for &(n, kf, vf, n_prot) in plan {
        let size = |f: FormatId, role| -> BlockSize {
            f.imp()
                .block_size(Shape { n, d, role }, n_prot, &QuantParams::default())
        };
        let (k, v) = (size(kf, Role::Key), size(vf, Role::Value));
        sum[0] += heads * (k.codes + v.codes);
        sum[1] += heads * (k.meta + v.meta);
        sum[2] += heads * k.total();
        sum[3] += heads * v.total();
    }
    sum
}

#[test]
fn residual_tokens_stay_f16_until_a_block_fills() {
    let mut r = rng("residual_tokens_stay_f16_until_a_block_fills");
    let (d, hk, layers, bt, recent) = (64, 2, 2, 32, 10);
    let cfg = CacheConfig {
        recent_f16: recent,
        ..f16_pair(layers, hk, d, bt)
    };
    let s = seq(&cfg, 120, 1.0, &mut r);
    let mut c = KvCache::new(cfg).unwrap();
    let heads = hk * layers;
    for t in 1..=120usize {
        fill(&mut c, &s, &[drip(120)], t - 1..t, false);
        let blocks = t.saturating_sub(recent) / bt;
        let res = t - blocks * bt;
        assert_eq!(c.n_residual(0), res, "after {t} tokens");
        let [codes, meta, _, _] = plan_bytes(
            &vec![(bt, FormatId::F16, FormatId::F16, 0); blocks],
            d,
            heads,
        );
        let m = c.memory();
        assert_eq!(m.codes as usize, codes, "after {t} tokens");
        assert_eq!(m.meta as usize, meta);
        assert_eq!(m.residual as usize, res * heads * d * 2 * 2);
        assert_eq!(m.total, m.codes + m.meta + m.residual);
        assert_eq!(m.bits_k, 16.0);
        assert_eq!(m.bits_v, 16.0);
    }
}

#[test]
fn errors_leave_the_cache_usable() {
    let mut r = rng("errors_leave_the_cache_usable");
    let (d, hk, n_head) = (64, 2, 4);
    let cfg = f16_pair(2, hk, d, 32);
    let s = seq(&cfg, 100, 1.0, &mut r);
    let mut c = KvCache::new(cfg).unwrap();
    fill(&mut c, &s, &[text(50), visual(30), drip(20)], 0..80, false);
    let row = hk * d;
    let q = r.normals(n_head * d);
    let before = decode(&c, 0, &q, n_head, 0.1);
    let mem = c.memory();
    let blocks = c.blocks(0).to_vec();
    let k = &s.k[0][80 * row..90 * row];
    let v = &s.v[0][80 * row..90 * row];
    let mut nan = k.to_vec();
    nan[3 * row + 70] = f32::NAN;
    let mut inf = v.to_vec();
    inf[5] = f32::INFINITY;
    let mut big = k.to_vec();
    big[9] = 1e6;
    let mut nan16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    nan16[2] = f16::NAN;
    let sal = [0.5f32; 10];
    let mut sal_nan = sal;
    sal_nan[4] = f32::NAN;
    type Append<'a> = (&'a str, usize, Rows<'a>, Rows<'a>, usize, Option<&'a [f32]>);
    let appends: Vec<Append> = vec![
        (
            "layer out of range",
            2,
            Rows::F32(k),
            Rows::F32(v),
            10,
            None,
        ),
        ("no tokens", 0, Rows::F32(&[]), Rows::F32(&[]), 0, None),
        ("short K", 0, Rows::F32(&k[1..]), Rows::F32(v), 10, None),
        (
            "long V",
            0,
            Rows::F32(k),
            Rows::F32(&s.v[0][80 * row..91 * row]),
            10,
            None,
        ),
        ("NaN in K", 0, Rows::F32(&nan), Rows::F32(v), 10, None),
        ("inf in V", 0, Rows::F32(k), Rows::F32(&inf), 10, None),
        ("beyond f16", 0, Rows::F32(&big), Rows::F32(v), 10, None),
        ("NaN in f16 K", 0, Rows::F16(&nan16), Rows::F32(v), 10, None),
        (
            "saliency length",
            0,
            Rows::F32(k),
            Rows::F32(v),
            10,
            Some(&sal[..9]),
        ),
        (
            "NaN saliency",
            0,
            Rows::F32(k),
            Rows::F32(v),
            10,
            Some(&sal_nan),
        ),
    ];
    for (what, l, k, v, n, sal) in appends {
        let e = c.append(l, k, v, n, Visual, sal);
        assert!(e.is_err(), "{what}: accepted");
        if what == "NaN in K" {
            assert!(
                matches!(
                    e,
                    Err(Error::NonFinite {
                        token: 3,
                        channel: 70
                    })
                ),
                "{e:?}"
            );
        }
    }
    let mut out = vec![0f32; n_head * d];
    let bad_q = {
        let mut x = q.clone();
        x[0] = f32::NAN;
        x
    };
    assert!(c.attention_decode(2, &q, n_head, &mut out, 0.1).is_err());
    assert!(
        c.attention_decode(0, &q[1..], n_head, &mut out, 0.1)
            .is_err()
    );
    assert!(
        c.attention_decode(0, &q, n_head, &mut out[1..], 0.1)
            .is_err()
    );
    assert!(
        c.attention_decode(0, &r.normals(3 * d), 3, &mut vec![0.0; 3 * d], 0.1)
            .is_err()
    );
    assert!(c.attention_decode(0, &[], 0, &mut [], 0.1).is_err());
    assert!(
        c.attention_decode(0, &bad_q, n_head, &mut out, 0.1)
            .is_err()
    );
    assert!(
        c.attention_decode(0, &q, n_head, &mut out, f32::NAN)
            .is_err()
    );
    assert!(c.attention_scores(0, &q, 3 * hk + 1, 0.1).is_err());
    assert!(c.attention_scores(5, &q, n_head, 0.1).is_err());
    let mut pout = vec![0f32; 81 * n_head * d];
    let pq = r.normals(81 * n_head * d);
    assert!(
        c.attention_prefill(0, &pq, 81, n_head, &mut pout, 0.1)
            .is_err()
    );
    assert!(
        c.attention_prefill(0, &[], 0, n_head, &mut [], 0.1)
            .is_err()
    );
    let (mut dk, mut dv) = (vec![f16::ZERO; 10 * row], vec![f16::ZERO; 10 * row]);
    assert!(c.dequantize(0, 75, 10, &mut dk, &mut dv).is_err());
    assert!(c.dequantize(0, usize::MAX, 10, &mut dk, &mut dv).is_err());
    assert!(c.dequantize(0, 0, 10, &mut dk[1..], &mut dv).is_err());
    assert!(c.dequantize(3, 0, 10, &mut dk, &mut dv).is_err());
    let empty = KvCache::new(f16_pair(1, hk, d, 32)).unwrap();
    assert!(
        empty
            .attention_decode(0, &q, n_head, &mut out, 0.1)
            .is_err()
    );

    assert_eq!(c.memory(), mem);
    assert_eq!(c.blocks(0), blocks.as_slice());
    assert_eq!((c.n_tokens(0), c.n_tokens(1)), (80, 80));
    assert_eq!(decode(&c, 0, &q, n_head, 0.1), before);
    // Still usable: the next append lands where it should.
    fill(
        &mut c,
        &s,
        &[text(50), visual(30), drip(20)],
        80..100,
        false,
    );
    for l in 0..2 {
        let (_, want) = reference(&q, &s.k[l], &s.v[l], 100, hk, d, n_head, 0.1, &no_fix);
        check_close("after errors", &decode(&c, l, &q, n_head, 0.1), &want, 1e-6);
    }
}

#[test]
fn config_presets_and_validation() {
    use FormatId::*;
    let c = CacheConfig::preset("calibquant", 28, 4, 128).unwrap();
    assert_eq!(
        (c.k_text, c.v_text, c.k_visual, c.v_visual),
        (F16, F16, Q1Calib, Q1Calib)
    );
    assert!(c.calibrate && c.calib_delta == 3.0 && c.recent_f16 == 0);
    let c = CacheConfig::preset("vidkv", 28, 4, 128).unwrap();
    assert_eq!(
        (c.k_text, c.v_text, c.k_visual, c.v_visual),
        (K1_5Mix, V1_58Tern, K1_5Mix, V1_58Tern)
    );
    assert_eq!((c.protect_fraction, c.calibrate), (0.2, false));
    let c = CacheConfig::preset("akvq", 28, 4, 128).unwrap();
    assert_eq!(
        (c.k_text, c.v_text, c.k_visual, c.v_visual),
        (Q4Had, Q4Had, Q2Had, Q2Had)
    );
    assert_eq!((c.pivot_factor, c.recent_f16), (Some(6.0), 128));
    let c = CacheConfig::preset("kivi2", 28, 4, 128).unwrap();
    assert_eq!((c.k_text, c.v_visual), (Kivi2, Kivi2));
    assert_eq!(
        (c.block_tokens, c.protect_fraction, c.pivot_factor),
        (BlockTokens::Fixed(128), 0.0, None)
    );
    assert_eq!(c.n_layer, 28);
    assert!(c.to_string().contains("kivi2"));

    match CacheConfig::preset("kivi3", 28, 4, 128) {
        Err(Error::InvalidArgument(m)) => {
            for p in CacheConfig::PRESETS {
                assert!(m.contains(p), "{m}");
            }
        }
        other => panic!("{:?}", other.map(|c| c.to_string())),
    }

    let base = CacheConfig::pair(F16, F16, 2, 2, 64);
    assert!(KvCache::new(base.clone()).is_ok());
    let bad = [
        CacheConfig {
            n_layer: 0,
            ..base.clone()
        },
        CacheConfig {
            n_head_kv: 0,
            ..base.clone()
        },
        CacheConfig {
            head_dim: 100,
            ..base.clone()
        },
        CacheConfig {
            block_tokens: BlockTokens::Fixed(16),
            ..base.clone()
        },
        CacheConfig {
            block_tokens: BlockTokens::Fixed(5000),
            ..base.clone()
        },
        CacheConfig {
            protect_fraction: 1.5,
            ..base.clone()
        },
        CacheConfig {
            protect_fraction: f32::NAN,
            ..base.clone()
        },
        CacheConfig {
            pivot_factor: Some(-1.0),
            ..base.clone()
        },
        CacheConfig {
            calib_delta: f32::INFINITY,
            ..base.clone()
        },
    ];
    for cfg in bad {
        assert!(KvCache::new(cfg.clone()).is_err(), "accepted {cfg:?}");
    }
    // A key-only format cannot hold values, nor a value-only one keys.
    for info in &kvbits::kv::FORMATS {
        let as_v = KvCache::new(CacheConfig::pair(F16, info.id, 1, 1, 64));
        let as_k = KvCache::new(CacheConfig::pair(info.id, F16, 1, 1, 64));
        assert_eq!(
            as_v.is_err(),
            info.applies == Applies::Keys,
            "{}",
            info.name
        );
        assert_eq!(
            as_k.is_err(),
            info.applies == Applies::Values,
            "{}",
            info.name
        );
        if let Err(Error::InvalidArgument(m)) = as_v {
            assert!(m.contains(info.name), "{m}");
        }
    }
}

/// Every format with K and V the same where it can hold both, VidKV's pair, and the presets.
fn all_configs(hk: usize) -> Vec<(String, CacheConfig)> {
    let blocks_64 = |c| CacheConfig {
        block_tokens: BlockTokens::Fixed(64),
        ..c
    };
    let mut out = vec![];
    for (i, info) in kvbits::kv::FORMATS.iter().enumerate() {
        let d = [64, 80, 128][i % 3];
        if info.applies == Applies::Both {
            let c = blocks_64(CacheConfig::pair(info.id, info.id, 1, hk, d));
            out.push((c.to_string(), c));
        }
    }
    let c = blocks_64(CacheConfig::pair(
        FormatId::K1_5Mix,
        FormatId::V1_58Tern,
        1,
        hk,
        80,
    ));
    out.push((c.to_string(), c));
    for (i, p) in CacheConfig::PRESETS.iter().enumerate() {
        let c = blocks_64(CacheConfig::preset(p, 1, hk, [128, 64, 80, 128][i]).unwrap());
        out.push((format!("{p}: {c}"), c));
    }
    out
}

/// The visual spans of the script whose logits the cache calibrates.
fn calibrated_spans(cfg: &CacheConfig, steps: &[Step]) -> Vec<(usize, usize)> {
    if cfg.calibrate && cfg.k_visual == FormatId::Q1Calib {
        visual_spans(steps)
    } else {
        vec![]
    }
}

#[test]
fn every_format_attends_over_its_own_reconstruction() {
    let mut r = rng("every_format_attends_over_its_own_reconstruction");
    let steps = [text(70), visual(150), drip(10), visual(40), text(20)];
    let n = total(&steps);
    let (hk, n_head, n_q) = (2, 4, 12);
    for (name, cfg) in all_configs(hk) {
        let d = cfg.head_dim;
        let s = seq(&cfg, n, 4.0, &mut r);
        let mut c = KvCache::new(cfg.clone()).unwrap();
        fill(&mut c, &s, &steps, 0..n, true);
        let m = c.memory();
        assert_eq!(m.total, m.codes + m.meta + m.residual, "{name}");
        assert_eq!(
            m.residual as usize,
            c.n_residual(0) * hk * d * 2 * 2,
            "{name}"
        );
        let (k, v) = dequantized(&c, 0);
        let (mut k16, mut v16) = (vec![f16::ZERO; k.len()], vec![f16::ZERO; v.len()]);
        c.dequantize(0, 0, n, &mut k16, &mut v16).unwrap();
        assert!(
            k16.iter().zip(&k).all(|(a, &b)| *a == f16::from_f32(b)),
            "{name}"
        );
        assert!(
            v16.iter().zip(&v).all(|(a, &b)| *a == f16::from_f32(b)),
            "{name}"
        );
        // A window of the middle reads the same as the whole.
        let (mut kw, mut vw) = (vec![0f32; 37 * hk * d], vec![0f32; 37 * hk * d]);
        c.dequantize_f32(0, 60, 37, &mut kw, &mut vw).unwrap();
        assert_eq!(kw, k[60 * hk * d..97 * hk * d], "{name}");
        assert_eq!(vw, v[60 * hk * d..97 * hk * d], "{name}");

        let spans = calibrated_spans(&cfg, &steps);
        let delta = cfg.calib_delta as f64;
        let fix = |a: &mut [f64]| calibrate_ref(a, &spans, delta);
        let scale = 1.5 / (d as f32).sqrt();
        let q = r.normals(n_head * d);
        let (logits, want) = reference(&q, &k, &v, n, hk, d, n_head, scale, &fix);
        check_close(
            &format!("{name}: decode"),
            &decode(&c, 0, &q, n_head, scale),
            &want,
            1e-5,
        );
        let scores = c.attention_scores(0, &q, n_head, scale).unwrap();
        check_close(&format!("{name}: scores"), &scores, &logits, 1e-5);

        let q = r.normals(n_q * n_head * d);
        let mut out = vec![0f32; q.len()];
        c.attention_prefill(0, &q, n_q, n_head, &mut out, scale)
            .unwrap();
        let rows = n_head * d;
        for i in 0..n_q {
            let qi = &q[i * rows..(i + 1) * rows];
            let end = n - n_q + i + 1;
            let (_, want) = reference(qi, &k, &v, end, hk, d, n_head, scale, &fix);
            let got = &out[i * rows..(i + 1) * rows];
            check_close(&format!("{name}: prefill query {i}"), got, &want, 1e-5);
        }
    }
}

#[test]
fn calibration_maps_each_visual_span_by_the_formula() {
    let mut r = rng("calibration_maps_each_visual_span_by_the_formula");
    let steps = [text(30), visual(150), text(20), visual(100), drip(5)];
    let n = total(&steps);
    let (hk, d, n_head) = (2, 128, 4);
    let cfg = CacheConfig::preset("calibquant", 1, hk, d).unwrap();
    let s = seq(&cfg, n, 4.0, &mut r);
    let mut c = KvCache::new(cfg.clone()).unwrap();
    fill(&mut c, &s, &steps, 0..n, false);
    let (k, v) = dequantized(&c, 0);
    let spans = visual_spans(&steps);
    let scale = 1.0 / (d as f32).sqrt();
    for (q_gain, delta) in [(3.0, 3.0), (3.0, 0.5), (0.01, 3.0), (3.0, 1e4)] {
        let mut cc = KvCache::new(CacheConfig {
            calib_delta: delta,
            ..cfg.clone()
        })
        .unwrap();
        fill(&mut cc, &s, &steps, 0..n, false);
        let q: Vec<f32> = r.normals(n_head * d).iter().map(|x| x * q_gain).collect();
        let fix = |a: &mut [f64]| calibrate_ref(a, &spans, delta as f64);
        let (raw, _) = reference(&q, &k, &v, n, hk, d, n_head, scale, &no_fix);
        let (logits, want) = reference(&q, &k, &v, n, hk, d, n_head, scale, &fix);
        let got = cc.attention_scores(0, &q, n_head, scale).unwrap();
        let what = format!("q x{q_gain}, δ {delta}");
        check_close(&format!("{what}: scores"), &got, &logits, 1e-5);
        check_close(
            &format!("{what}: decode"),
            &decode(&cc, 0, &q, n_head, scale),
            &want,
            1e-5,
        );
        // Where some span is wider than δ the calibration must show; where none is, the
        // scores are the raw ones, in the same order.
        let wide = (0..n_head).any(|h| {
            spans.iter().any(|&(a, b)| {
                let x = &raw[h * n + a..h * n + b];
                let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
                x.iter().any(|&y| y - lo > delta)
            })
        });
        assert_eq!(
            wide,
            delta < 10.0 && q_gain > 1.0,
            "{what}: the test's premise"
        );
        if wide {
            assert!(
                rel_err(&got, &raw) > 1e-3,
                "{what}: calibration had no effect"
            );
        } else {
            check_close(&format!("{what}: unchanged"), &got, &raw, 1e-5);
        }
        // Text tokens and the residual are never calibrated.
        for h in 0..n_head {
            for t in (0..30).chain(180..200).chain(300..n) {
                let (a, b) = (got[h * n + t], raw[h * n + t]);
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: token {t}");
            }
        }
    }
    // Off, the same formats give the raw scores.
    let mut off = KvCache::new(CacheConfig {
        calibrate: false,
        ..cfg
    })
    .unwrap();
    fill(&mut off, &s, &steps, 0..n, false);
    let q: Vec<f32> = r.normals(n_head * d).iter().map(|x| x * 3.0).collect();
    let (raw, _) = reference(&q, &k, &v, n, hk, d, n_head, scale, &no_fix);
    let got = off.attention_scores(0, &q, n_head, scale).unwrap();
    check_close("calibration off", &got, &raw, 1e-5);
}

#[test]
fn memory_report_matches_the_block_plan() {
    use FormatId::{F16, Q1Calib};
    let mut r = rng("memory_report_matches_the_block_plan");
    let (layers, hk, d) = (2, 2, 128);
    let cfg = CacheConfig::preset("calibquant", layers, hk, d).unwrap();
    let steps = [text(64), visual(300), drip(5)];
    let s = seq(&cfg, total(&steps), 4.0, &mut r);
    let mut c = KvCache::new(cfg).unwrap();
    fill(&mut c, &s, &steps, 0..usize::MAX, false);
    // The text span closes when the image comes: one partial f16 block; the image is
    // quantized at once, 128 + 128 + 44; the last 5 text tokens wait in the residual.
    let plan = [
        (64, F16, F16, 0),
        (128, Q1Calib, Q1Calib, 0),
        (128, Q1Calib, Q1Calib, 0),
        (44, Q1Calib, Q1Calib, 0),
    ];
    let mut first = 0;
    for l in 0..layers {
        let got: Vec<(usize, usize, FormatId, FormatId)> = c
            .blocks(l)
            .iter()
            .map(|b| (b.first, b.n_tokens, b.k, b.v))
            .collect();
        let want: Vec<(usize, usize, FormatId, FormatId)> = plan
            .iter()
            .map(|&(n, k, v, _)| {
                first += n;
                (first - n, n, k, v)
            })
            .collect();
        first = 0;
        assert_eq!(got, want);
        assert_eq!(c.n_residual(l), 5);
    }
    let [codes, meta, k_bytes, v_bytes] = plan_bytes(&plan, d, hk * layers);
    let residual = 5 * d * 2 * hk * layers;
    let m = c.memory();
    assert_eq!(
        (m.codes as usize, m.meta as usize, m.residual as usize * 2),
        (codes, meta, residual * 2 * 2)
    );
    assert_eq!(m.total, m.codes + m.meta + m.residual);
    let values = (369 * hk * d * layers) as f64;
    assert!((m.bits_k - (k_bytes + residual) as f64 * 8.0 / values).abs() < 1e-12);
    assert!((m.bits_v - (v_bytes + residual) as f64 * 8.0 / values).abs() < 1e-12);
}

#[test]
fn quantized_bytes_grow_block_by_block() {
    let mut r = rng("quantized_bytes_grow_block_by_block");
    let (d, hk, bt) = (64, 2, 32);
    let cfg = per_token_pair(FormatId::Q8_0, 1, hk, d, bt);
    let s = seq(&cfg, 100, 4.0, &mut r);
    let mut c = KvCache::new(cfg).unwrap();
    let mut last = c.memory();
    for t in 1..=100usize {
        fill(&mut c, &s, &[drip(100)], t - 1..t, false);
        let m = c.memory();
        let blocks = t / bt;
        let [codes, meta, k, v] = plan_bytes(
            &vec![(bt, FormatId::Q8_0, FormatId::Q8_0, 0); blocks],
            d,
            hk,
        );
        assert_eq!(
            (m.codes as usize, m.meta as usize),
            (codes, meta),
            "after {t} tokens"
        );
        let res = (t % bt) * hk * d * 2;
        assert_eq!(m.residual as usize, 2 * res);
        let values = (t * hk * d) as f64;
        assert!((m.bits_k - (k + res) as f64 * 8.0 / values).abs() < 1e-12);
        assert!((m.bits_v - (v + res) as f64 * 8.0 / values).abs() < 1e-12);
        if t % bt == 0 {
            assert!(
                m.total < last.total,
                "a block of q8_0 is smaller than its f16 tokens"
            );
        } else {
            assert_eq!(m.total - last.total, (hk * d * 2 * 2) as u64);
        }
        last = m;
    }
}

/// Relative reconstruction error of each token of KV head `g`, `[t][hk][d]` rows.
fn token_errors(got: &[f32], want: &[f32], hk: usize, d: usize, g: usize) -> Vec<f64> {
    (0..want.len() / (hk * d))
        .map(|t| {
            let r = (t * hk + g) * d..(t * hk + g + 1) * d;
            rel_err(&got[r.clone()], &want[r])
        })
        .collect()
}

#[test]
fn vidkv_protects_the_most_salient_tokens() {
    let mut r = rng("vidkv_protects_the_most_salient_tokens");
    let (hk, d, n) = (2, 128, 200);
    let cfg = CacheConfig::preset("vidkv", 1, hk, d).unwrap();
    let mut s = seq(&cfg, n, 1.0, &mut r);
    // The 40 most salient tokens (20% of 200) and the next 10 have values 8 times wider:
    // unprotected, ternary codes clamp them to ±γ.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| s.saliency[b].total_cmp(&s.saliency[a]).then(a.cmp(&b)));
    let wide_rows = |s: &mut Seq, tokens: &[usize]| {
        for &t in tokens {
            for x in &mut s.v[0][t * hk * d..(t + 1) * hk * d] {
                *x = f16::from_f32(*x * 8.0).to_f32();
            }
        }
    };
    wide_rows(&mut s, &order[..50]);
    let run = |s: &Seq, salient: bool| {
        let mut c = KvCache::new(cfg.clone()).unwrap();
        fill(&mut c, s, &[visual(n)], 0..n, salient);
        let (_, v) = dequantized(&c, 0);
        (c.memory(), v)
    };
    let (m_on, v_on) = run(&s, true);
    let (m_off, v_off) = run(&s, false);
    let mean = |e: &[f64], ts: &[usize]| ts.iter().map(|&t| e[t]).sum::<f64>() / ts.len() as f64;
    for g in 0..hk {
        let on = token_errors(&v_on, &s.v[0], hk, d, g);
        let off = token_errors(&v_off, &s.v[0], hk, d, g);
        let (top, next) = (&order[..40], &order[40..50]);
        eprintln!(
            "head {g}: protected {:.3} (unprotected {:.3}); next 10 {:.3}",
            mean(&on, top),
            mean(&off, top),
            mean(&on, next)
        );
        assert!(mean(&on, top) < 0.5 * mean(&off, top));
        assert!(
            mean(&on, top) < 0.5 * mean(&on, next),
            "the 41st to 50th must not be protected"
        );
    }
    // 40 protected tokens per value block of each head, none in the keys (k1_5_mix does not
    // protect).
    let p = &cfg.quant;
    let kb = |n| {
        let shape = Shape {
            n,
            d,
            role: Role::Key,
        };
        FormatId::K1_5Mix.imp().block_size(shape, 0, p).total()
    };
    let vb = |n, n_p| {
        let shape = Shape {
            n,
            d,
            role: Role::Value,
        };
        FormatId::V1_58Tern.imp().block_size(shape, n_p, p).total()
    };
    let plan = |n_p: (usize, usize)| hk * (kb(128) + kb(72) + vb(128, n_p.0) + vb(72, n_p.1));
    let top_in_first = order[..40].iter().filter(|&&t| t < 128).count();
    assert_eq!(m_on.total as usize, plan((top_in_first, 40 - top_in_first)));
    assert_eq!(m_off.total as usize, plan((0, 0)));
}

#[test]
fn saliency_ties_go_to_the_earlier_token() {
    let mut r = rng("saliency_ties_go_to_the_earlier_token");
    let (hk, d, n) = (1, 64, 50);
    let cfg = CacheConfig {
        protect_fraction: 0.25,
        ..CacheConfig::preset("vidkv", 1, hk, d).unwrap()
    };
    let mut s = seq(&cfg, n, 1.0, &mut r);
    // round(0.25 · 50) = 13 (12.5 rounds up): with equal saliency, tokens 0..13.
    s.saliency.iter_mut().for_each(|x| *x = 0.5);
    for x in &mut s.v[0][..20 * d] {
        *x = f16::from_f32(*x * 8.0).to_f32();
    }
    let mut c = KvCache::new(cfg.clone()).unwrap();
    fill(&mut c, &s, &[visual(n)], 0..n, true);
    let (_, v) = dequantized(&c, 0);
    let e = token_errors(&v, &s.v[0], hk, d, 0);
    let worst_kept = e[..13].iter().copied().fold(0.0, f64::max);
    let best_rest = e[13..20].iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        worst_kept < best_rest,
        "kept {worst_kept:.3}, rest {best_rest:.3}"
    );
    let p = FormatId::V1_58Tern.imp().block_size(
        Shape {
            n,
            d,
            role: Role::Value,
        },
        13,
        &cfg.quant,
    );
    let k = FormatId::K1_5Mix.imp().block_size(
        Shape {
            n,
            d,
            role: Role::Key,
        },
        0,
        &cfg.quant,
    );
    assert_eq!(c.memory().total as usize, p.total() + k.total());
}

#[test]
fn akvq_keeps_a_pivot_token_exact_in_keys_and_values() {
    let mut r = rng("akvq_keeps_a_pivot_token_exact_in_keys_and_values");
    let (hk, d, n, pivot) = (2, 128, 200, 17);
    let cfg = CacheConfig::preset("akvq", 1, hk, d).unwrap();
    let mut s = seq(&cfg, n, 1.0, &mut r);
    for x in &mut s.k[0][pivot * hk * d..(pivot + 1) * hk * d] {
        *x = f16::from_f32(*x * 20.0).to_f32();
    }
    let mut c = KvCache::new(cfg.clone()).unwrap();
    fill(&mut c, &s, &[visual(n)], 0..n, false);
    // The last 128 tokens stay f16, and the 72 older ones wait for the rest of their span.
    assert_eq!(c.n_residual(0), 200);
    c.flush();
    assert_eq!(c.n_residual(0), 0);
    let (k, v) = dequantized(&c, 0);
    let row = |x: &[f32], t: usize| x[t * hk * d..(t + 1) * hk * d].to_vec();
    assert_eq!(row(&k, pivot), row(&s.k[0], pivot));
    assert_eq!(row(&v, pivot), row(&s.v[0], pivot));
    assert!(
        rel_err(&row(&k, 3), &row(&s.k[0], 3)) > 1e-3,
        "other tokens are quantized"
    );
    // One pivot in the first K and V block of each head.
    let size = |n, n_p, role| {
        FormatId::Q2Had
            .imp()
            .block_size(Shape { n, d, role }, n_p, &cfg.quant)
            .total()
    };
    let plan: usize = [(128, 1), (72, 0)]
        .iter()
        .map(|&(n, p)| size(n, p, Role::Key) + size(n, p, Role::Value))
        .sum();
    assert_eq!(c.memory().total as usize, hk * plan);
}

#[test]
fn a_block_its_format_refuses_is_kept_f16() {
    let mut r = rng("a_block_its_format_refuses_is_kept_f16");
    let (hk, d, n_head) = (2, 64, 4);
    let cfg = CacheConfig {
        recent_f16: 16,
        ..per_token_pair(FormatId::Q2Had, 1, hk, d, 32)
    };
    let mut s = seq(&cfg, 80, 1.0, &mut r);
    // In range, but its rotation puts 8 × 60000 in one coefficient: q2_had refuses it, and
    // only when the block is quantized, long after the append was accepted.
    s.k[0][(5 * hk + 1) * d..(5 * hk + 2) * d].fill(-60000.0);
    let mut c = KvCache::new(cfg.clone()).unwrap();
    fill(&mut c, &s, &[drip(80)], 0..80, false);
    let formats: Vec<(FormatId, FormatId)> = c.blocks(0).iter().map(|b| (b.k, b.v)).collect();
    assert_eq!(
        formats,
        [
            (FormatId::F16, FormatId::Q2Had),
            (FormatId::Q2Had, FormatId::Q2Had)
        ]
    );
    let (k, v) = dequantized(&c, 0);
    assert_eq!(k[..32 * hk * d], s.k[0][..32 * hk * d]);
    let q = r.normals(n_head * d);
    let (_, want) = reference(&q, &k, &v, 80, hk, d, n_head, 0.1, &no_fix);
    check_close("attention", &decode(&c, 0, &q, n_head, 0.1), &want, 1e-5);
    let size = |f: FormatId, role| {
        f.imp()
            .block_size(Shape { n: 32, d, role }, 0, &cfg.quant)
            .total()
    };
    let blocks = size(FormatId::F16, Role::Key)
        + size(FormatId::Q2Had, Role::Key)
        + 2 * size(FormatId::Q2Had, Role::Value);
    assert_eq!(c.memory().total as usize, hk * blocks + 16 * hk * d * 2 * 2);
}
