//! Fast `k1_5_mix` scores (see `formats/k1_5_mix.rs`), straight from the codes: per block
//! and head, the query goes through the adjoint of the inverse FFT once (one plan for the
//! block) and is folded with the steps and scales; a token scores
//! `base + Σ_j qs_j·code_j + Σ_k 2f_k·bit_k` (a sign `±1` is `2·bit − 1`, the `−Σ f` is in the
//! base), both runs of codes dotted for `L` tokens at once ([`token_dots`]). Keys only: sums
//! (never asked of a key format) run the reference.

use std::marker::PhantomData;

use super::f16::f16s_to_f32;
use super::lanes::{self, Lanes, Scores, code_weights, row_index, store_lanes, token_dots};
use super::{Kernel, PerHead};
use crate::kv::formats::k1_5_mix::{Layout, Spectrum};
use crate::kv::{FormatId, Shape};

/// The kernels on lanes `V`.
pub(crate) struct K1_5MixFast<V>(pub(crate) PhantomData<V>);

impl<V: Lanes + Sync> Kernel for K1_5MixFast<V> {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        // SAFETY: `kernel` hands out `V`'s kernels only where its features are present.
        unsafe { lanes::scores::<V, Keys>(block, shape, q, out, stride) }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        PerHead(FormatId::K1_5Mix).accumulate(block, shape, p, stride, out)
    }
}

struct Keys;

impl Scores for Keys {
    #[inline(always)]
    unsafe fn scores<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        q: &[f32],
        out: &mut [f32],
        stride: usize,
    ) {
        let (n, d) = (shape.n, shape.d);
        let l = Layout::read(block, d);
        let (dh, dl) = (l.hi.len(), l.lo.len());
        // The stored parameters as f32: (lo, step) per 2-bit channel, scale per coefficient.
        let (mut pairs, mut scales) = ([0f32; 512], [0f32; 256]);
        let (pairs, scales) = (&mut pairs[..2 * dh], &mut scales[..dl]);
        f16s_to_f32(&block[l.params..l.params + 4 * dh], pairs);
        f16s_to_f32(&block[l.scales..l.scales + 2 * dl], scales);
        let (cw2, cw1) = (const { code_weights::<2>() }, const { code_weights::<1>() });
        // Weights of the 2-bit codes, then of the coefficient bits, interleaved by head.
        let mut w = [0f32; 7 * 256];
        let mut base = [0f32; H];
        let mut spectrum = Spectrum::new(dl);
        let mut wl = [0f64; 256];
        let wl = &mut wl[..dl];
        for (h, b) in base.iter_mut().enumerate() {
            let qh = &q[h * d..(h + 1) * d];
            spectrum.adjoint(l.lo.iter().map(|&c| qh[c]), wl);
            let mut acc = 0f32;
            for (j, &c) in l.hi.iter().enumerate() {
                acc += qh[c] * pairs[2 * j];
                w[j * H + h] = qh[c] * pairs[2 * j + 1] * cw2[j % 16];
            }
            for (k, (&wk, &scale)) in wl.iter().zip(&*scales).enumerate() {
                let f = wk as f32 * scale;
                acc -= f;
                w[(dh + k) * H + h] = 2.0 * f * cw1[k % 32];
            }
            *b = acc;
        }
        let rows = &block[l.codes..l.codes + n * l.stride];
        for t0 in (0..n).step_by(V::L) {
            let mt = V::L.min(n - t0);
            // SAFETY: lanes read rows `t0..t0 + mt`, inside `rows`; each run's end has four bytes
            // of its row before it (the 2-bit run alone holds `dh / 4 ≥ 4`).
            unsafe {
                let idx = row_index::<V>(0, l.stride, t0, mt);
                let mut acc = base.map(|b| V::splat(b));
                token_dots::<V, H, 2>(rows.as_ptr(), idx, 0, dh, &w, &[], &mut acc);
                token_dots::<V, H, 1>(rows.as_ptr(), idx, dh / 4, dl, &w[dh * H..], &[], &mut acc);
                for (h, a) in acc.into_iter().enumerate() {
                    store_lanes::<V>(&mut out[h * stride + t0..][..mt], a);
                }
            }
        }
    }
}
