//! Fast `q2_had` and `q4_had` (see `formats/q2_had.rs`), straight from the codes.
//!
//! Scores: every head's query is rotated once per step and thread (the rotation is symmetric
//! and orthonormal, so `q·R(ŷ) = (Rq)·ŷ`); per group of 64 rotated channels a token scores
//! `step·(Rq · codes) + lo·Σ Rq`, the code dots taken for `L` tokens at once
//! ([`token_dots`]) and the token's `(lo, step)` gathered beside them.
//!
//! Sums: per token and group the offset goes into one sum per head and group
//! ([`group_steps`]) and the step onto the codes, once for every head; codes are summed with
//! channels as lanes ([`channel_sums`]) in the rotated basis, rotated back once per block and head. Pivot
//! tokens (f16 rows) are few and take the plain path.

use std::cell::RefCell;
use std::marker::PhantomData;

use super::f16::f16s_to_f32;
use super::lanes::{
    self, Lanes, Packed, Scaled, Scores, Sums, channel_sums, code_weights, group_steps, pairs,
    row_index, row_weights, store_lanes, token_dots,
};
use super::{Kernel, dot};
use crate::kv::Shape;
use crate::kv::formats::q2_had::{HEADER, Token, codes_at, groups, record_len, rotate, tokens};

/// The weights this thread derived last from a pass's queries, and what they came from:
/// every block of a decode step brings the same queries, and one rotation serves them all.
#[derive(Default)]
struct Prepared {
    q: Vec<f32>,
    heads: usize,
    bits: usize,
    /// The rotated queries with the code positions folded in, interleaved by head.
    w: Vec<f32>,
    /// The rotated queries' sums per head and group.
    q_sums: Vec<[f32; 4]>,
}

thread_local! {
    static PREPARED: RefCell<Prepared> = RefCell::new(Prepared::default());
}

/// The kernels on lanes `V` at `BITS` bits per code (2: `q2_had`, 4: `q4_had`).
pub(crate) struct HadFast<V, const BITS: usize>(pub(crate) PhantomData<V>);

impl<V: Lanes + Sync, const BITS: usize> Kernel for HadFast<V, BITS> {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        // SAFETY: `kernel` hands out `V`'s kernels only where its features are present.
        unsafe { lanes::scores::<V, Had<BITS>>(block, shape, q, out, stride) }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        // SAFETY: as in `scores`.
        unsafe { lanes::sums::<V, Had<BITS>>(block, shape, p, stride, out) }
    }
}

struct Had<const BITS: usize>;

impl<const BITS: usize> Scores for Had<BITS> {
    #[inline(always)]
    unsafe fn scores<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        q: &[f32],
        out: &mut [f32],
        stride: usize,
    ) {
        let d = shape.d;
        let s = split(block, shape, BITS);
        let rec = record_len(d, BITS);
        let records = &block[..HEADER + s.n_q * rec];
        // Weights: the rotated queries with the code positions folded in, interleaved by head;
        // and the rotated queries' sums per group. Derived once per step and thread; a block
        // copies them (the closure runs without the vector features: it does no more).
        let mut w = [0f32; 7 * 256];
        let mut q_sums = [[0f32; 4]; H];
        PREPARED.with_borrow_mut(|p| {
            let same = p.heads == H
                && p.bits == BITS
                && p.q.len() == q.len()
                && p.q.iter().zip(q).all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                prepare::<BITS>(p, q, H);
            }
            w[..H * d].copy_from_slice(&p.w);
            q_sums.copy_from_slice(&p.q_sums);
        });
        for k0 in (0..s.n_q).step_by(V::L) {
            let mt = V::L.min(s.n_q - k0);
            // SAFETY: lanes read records `k0..k0 + mt`, inside `records`.
            let total = unsafe {
                let idx = row_index::<V>(HEADER, rec, k0, mt);
                let mut total = [V::zero(); H];
                for (g, r) in groups(d).enumerate() {
                    let mut acc = [[V::zero(); H]];
                    let at = codes_at(d) + r.start * BITS / 8;
                    token_dots::<V, H, BITS, 1>(
                        records.as_ptr(),
                        [idx],
                        at,
                        r.len(),
                        &w[r.start * H..],
                        &[],
                        &mut acc,
                    );
                    let [acc] = acc;
                    let (lo, step) = pairs::<V>(records.as_ptr().add(4 * g), idx);
                    for h in 0..H {
                        let t = V::fma(lo, V::splat(q_sums[h][g]), total[h]);
                        total[h] = V::fma(step, acc[h], t);
                    }
                }
                total
            };
            for (h, t) in total.into_iter().enumerate() {
                let o = &mut out[h * stride..];
                if s.quantized.is_empty() {
                    // SAFETY: AVX2 at least, as every caller.
                    unsafe { store_lanes::<V>(&mut o[k0..k0 + mt], t) };
                } else {
                    let mut lanes = [0f32; 16];
                    // SAFETY: as above; `lanes` holds 16 floats.
                    unsafe { store_lanes::<V>(&mut lanes[..V::L], t) };
                    for (i, &v) in lanes[..mt].iter().enumerate() {
                        o[s.quantized[k0 + i]] = v;
                    }
                }
            }
        }
        let mut row = [0f32; 256];
        for &(t, bytes) in &s.pivots {
            f16s_to_f32(bytes, &mut row[..d]);
            for h in 0..H {
                out[h * stride + t] = dot(&q[h * d..(h + 1) * d], &row[..d]);
            }
        }
    }
}

impl<const BITS: usize> Sums for Had<BITS> {
    #[inline(always)]
    unsafe fn sums<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        p: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        let d = shape.d;
        let s = split(block, shape, BITS);
        let rec = record_len(d, BITS);
        let records = &block[..HEADER + s.n_q * rec];
        let mut rotated = vec![0f32; H * d];
        let w = row_weights::<H>(p, stride, &s.quantized, s.n_q);
        let mut step = vec![0f32; s.n_q];
        for (g, r) in groups(d).enumerate() {
            // SAFETY: every record's pair and codes lie in `records`.
            let lo_sum = unsafe {
                let ptr = records.as_ptr();
                let at = HEADER + 4 * g;
                let (tok, n_q) = (&s.quantized, s.n_q);
                let lo_sum = group_steps::<V, H>(ptr, at, rec, tok, n_q, p, stride, &mut step);
                let codes = Packed::<BITS> {
                    base: ptr,
                    first: HEADER + codes_at(d),
                    stride: rec,
                };
                let codes = Scaled {
                    codes,
                    scale: &step,
                };
                channel_sums::<V, H>(r.clone(), s.n_q, &codes, &w, &mut rotated, d);
                lo_sum
            };
            for (h, ls) in lo_sum.iter().enumerate() {
                rotated[h * d..][r.clone()]
                    .iter_mut()
                    .for_each(|o| *o += ls);
            }
        }
        let mut row = [0f32; 256];
        for &(t, bytes) in &s.pivots {
            f16s_to_f32(bytes, &mut row[..d]);
            for h in 0..H {
                let pt = p[h * stride + t];
                out[h * d..(h + 1) * d]
                    .iter_mut()
                    .zip(&row[..d])
                    .for_each(|(o, &x)| *o += pt * x);
            }
        }
        for (ah, oh) in rotated.chunks_exact_mut(d).zip(out.chunks_exact_mut(d)) {
            rotate(ah);
            oh.iter_mut().zip(ah.iter()).for_each(|(o, &a)| *o += a);
        }
    }
}

/// Rotates `heads` queries `q` and derives [`Prepared`]'s weights from them.
fn prepare<const BITS: usize>(p: &mut Prepared, q: &[f32], heads: usize) {
    let d = q.len() / heads;
    let cw = const { code_weights::<BITS>() };
    p.q.clear();
    p.q.extend_from_slice(q);
    (p.heads, p.bits) = (heads, BITS);
    let mut rotated = q.to_vec();
    rotated.chunks_exact_mut(d).for_each(rotate);
    p.w.resize(heads * d, 0.0);
    p.q_sums.clear();
    for (h, qr) in rotated.chunks_exact(d).enumerate() {
        let mut qs = [0f32; 4];
        for (g, r) in groups(d).enumerate() {
            qs[g] = super::sum(&qr[r]);
        }
        p.q_sums.push(qs);
        for (j, &x) in qr.iter().enumerate() {
            p.w[j * heads + h] = x * cw[j % (32 / BITS)];
        }
    }
}

/// A block's quantized tokens (records, in order) and its pivot tokens.
struct Split<'a> {
    /// Token of each record; empty when there is no pivot (record `k` is token `k`).
    quantized: Vec<usize>,
    pivots: Vec<(usize, &'a [u8])>,
    n_q: usize,
}

fn split(block: &[u8], shape: Shape, bits: usize) -> Split<'_> {
    let n_p = u32::from_le_bytes([block[0], block[1], block[2], block[3]]) as usize;
    let mut s = Split {
        quantized: Vec::new(),
        pivots: Vec::new(),
        n_q: shape.n - n_p,
    };
    if n_p > 0 {
        for (t, tok) in tokens(block, shape, bits).enumerate() {
            match tok {
                Token::Quantized(_) => s.quantized.push(t),
                Token::Protected(row) => s.pivots.push((t, row)),
            }
        }
    }
    s
}
