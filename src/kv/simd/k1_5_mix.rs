//! Fast `k1_5_mix` scores (see `formats/k1_5_mix.rs`), straight from the codes: per block
//! and head, the query goes through the adjoint of the inverse FFT once (one transform per
//! thread, [`Spectrum::with`]) and is folded with the steps and scales; a token scores
//! `base + Σ_j qs_j·code_j + Σ_k 2f_k·bit_k` (a sign `±1` is `2·bit − 1`, the `−Σ f` is in the
//! base). The 2-bit codes are dotted for `L` tokens at once ([`token_dots`]); the sign bits go
//! through q1_calib's nibble tables ([`bit_scores`]), four bits per table lookup (one permute
//! on AVX-512, two and a blend on AVX2) instead of an FMA each. Keys only: sums (never asked
//! of a key format) run the reference.

use std::marker::PhantomData;

use super::f16::f16s_to_f32;
use super::lanes::{
    self, Lanes, Scores, code_weights, row_index, splat_each, store_lanes, token_dots,
};
use super::q1_calib::{BitRows, bit_scores};
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
        let cw2 = const { code_weights::<2>() };
        // Weights of the 2-bit codes interleaved by head; of the coefficient bits, by head.
        let (mut w, mut wb) = ([0f32; 7 * 256], [0f32; 7 * 256]);
        let mut base = [0f32; H];
        let mut wl = [0f64; 256];
        let wl = &mut wl[..dl];
        Spectrum::with(dl, |spectrum| {
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
                    wb[h * dl + k] = 2.0 * f;
                }
                *b = acc;
            }
        });
        let rows = &block[l.codes..l.codes + n * l.stride];
        for t0 in (0..n).step_by(V::L) {
            let mt = V::L.min(n - t0);
            // SAFETY: lanes read rows `t0..t0 + mt`, inside `rows`; the 2-bit run holds
            // `dh / 4 ≥ 4` bytes.
            unsafe {
                let idx = row_index::<V>(0, l.stride, t0, mt);
                let mut acc = [splat_each::<V, H>(&base)];
                token_dots::<V, H, 2, 1>(rows.as_ptr(), [idx], 0, dh, &w, &[], &mut acc);
                for (h, a) in acc[0].into_iter().enumerate() {
                    store_lanes::<V>(&mut out[h * stride + t0..][..mt], a);
                }
            }
        }
        let signs = BitRows {
            bytes: rows,
            first: dh / 4,
            stride: l.stride,
            len: dl / 8,
        };
        // SAFETY: `V`'s features are this path's (AVX-512 F/BW for 16 lanes, else AVX2 and
        // FMA); the sign run has the 2-bit run's four bytes before it.
        unsafe { bit_scores(&signs, n, &wb, &[0.0; H], true, out, stride, V::L == 16) }
    }
}
