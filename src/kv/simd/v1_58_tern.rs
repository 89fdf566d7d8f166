//! Fast `v1_58_tern` sums (see `formats/v1_58_tern.rs`), straight from the codes: channels
//! are lanes; a trit byte of `L` channels (five tokens) is widened once and its five digits
//! read in turn by TQ1_0's multiply-and-shift, and every head's softmax weight is added under
//! each digit with the accumulators in registers ([`trit_sums`]). The per-channel scales
//! apply once per block. Salient tokens' 2-bit codes are summed by [`channel_sums`]. Scores
//! (never asked of a value format) run the reference.

use std::marker::PhantomData;

use super::f16::f16s_to_f32;
use super::lanes::{self, Lanes, Packed, Sums, channel_sums, heads_fma};
use super::{Kernel, PerHead};
use crate::kv::formats::v1_58_tern::{Layout, Row};
use crate::kv::{FormatId, Shape};

/// The kernels on lanes `V`.
pub(crate) struct V1_58TernFast<V>(pub(crate) PhantomData<V>);

impl<V: Lanes + Sync> Kernel for V1_58TernFast<V> {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        PerHead(FormatId::V1_58Tern).scores(block, shape, q, out, stride)
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        // SAFETY: `kernel` hands out `V`'s kernels only where its features are present.
        unsafe { lanes::sums::<V, Values>(block, shape, p, stride, out) }
    }
}

struct Values;

impl Sums for Values {
    #[inline(always)]
    unsafe fn sums<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        p: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        let (n, d) = (shape.n, shape.d);
        let l = Layout::read(block, shape);
        let n_u = n - l.n_p;
        // Softmax weights of the ternary tokens, then of the salient ones, interleaved by head.
        let (mut wu, mut wp) = (vec![0f32; H * n_u], vec![0f32; H * l.n_p]);
        l.for_tokens(block, n, |t, row| {
            let (w, i) = match row {
                Row::Ternary(u) => (&mut wu, u),
                Row::Protected(r) => (&mut wp, r),
            };
            for h in 0..H {
                w[i * H + h] = p[h * stride + t];
            }
        });
        let (mut terns, mut codes) = (vec![0f32; H * d], vec![0f32; H * d]);
        let trits = &block[l.trits..l.trits + n_u.div_ceil(5) * d];
        let salient = Packed::<2> {
            base: block[l.protected..l.protected + l.n_p * d / 4].as_ptr(),
            first: 0,
            stride: d / 4,
        };
        // SAFETY: `V`'s features are the caller's; `trit_sums` checks its reads, and each
        // salient row read lies in its part of the block (sliced above).
        unsafe {
            trit_sums::<V, H>(trits, d, n_u, &wu, &mut terns);
            channel_sums::<V, H>(0..d, l.n_p, &salient, &wp, &mut codes, d);
        }
        let mut sum_p = [0f32; H];
        for (h, s) in sum_p.iter_mut().enumerate() {
            *s = wp.iter().skip(h).step_by(H).sum();
        }
        let (mut gamma, mut pairs) = ([0f32; 256], [0f32; 512]);
        f16s_to_f32(&block[l.gamma..l.gamma + 2 * d], &mut gamma[..d]);
        if l.n_p > 0 {
            f16s_to_f32(&block[l.minmax..l.minmax + 4 * d], &mut pairs[..2 * d]);
        }
        for h in 0..H {
            for c in 0..d {
                let (lo, step) = (pairs[2 * c], pairs[2 * c + 1]);
                let v = terns[h * d + c] * gamma[c] + codes[h * d + c] * step + sum_p[h] * lo;
                out[h * d + c] += v;
            }
        }
    }
}

/// `out[h·d + c] += Σ_u w[u·H + h]·trit_uc` over the `n_u` ternary rows of `trits` (row
/// `u`'s trit of channel `c` is digit `u % 5` of byte `(u / 5)·d + c`), `L` channels at a time.
/// A byte's digits come out in order: with `m = byte`, each step takes `t = 3m`, its digit
/// `t >> 8` and `m = t & 255` (TQ1_0); the trit is the digit less one.
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
unsafe fn trit_sums<V: Lanes, const H: usize>(
    trits: &[u8],
    d: usize,
    n_u: usize,
    w: &[f32],
    out: &mut [f32],
) {
    assert!(trits.len() >= n_u.div_ceil(5) * d && w.len() >= n_u * H && out.len() >= H * d);
    // Every head dim is a multiple of 16, so a row's bytes come in whole vectors.
    assert!(d.is_multiple_of(V::L));
    // SAFETY: every byte read lies in `trits` and every weight in `w` (asserted).
    unsafe {
        let (three, low, minus_one) = (V::splat_i(3), V::splat_i(0xFF), V::splat(-1.0));
        for c0 in (0..d).step_by(V::L) {
            let mut acc = [V::zero(); H];
            for g in 0..n_u.div_ceil(5) {
                let mut m = V::bytes(trits.as_ptr().add(g * d + c0));
                for u in 5 * g..(5 * g + 5).min(n_u) {
                    let t = V::mullo(m, three);
                    m = V::and(t, low);
                    let trit = V::add(V::cvt(V::srl(t, 8)), minus_one);
                    heads_fma::<V, H>(trit, w.as_ptr().add(u * H), &mut acc);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let o = out.as_mut_ptr().add(h * d + c0);
                V::store(o, V::add(V::load(o), *a));
            }
        }
    }
}
