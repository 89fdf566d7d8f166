//! Fast `k1_5_mix` scores (see `formats/k1_5_mix.rs`): per block and head, the query goes
//! through the adjoint of the inverse FFT once and is folded with the steps and scales; each
//! token's 2-bit codes and coefficient signs are decoded once into a row (codes, then ±1) that
//! every head reads. Keys only: sums (never asked of a key format) run the reference.

use super::q2_had::unpack;
use super::rows::store_dots;
use super::{Kernel, PerHead};
use crate::kv::formats::k1_5_mix::{Layout, adjoint};
use crate::kv::{FormatId, Shape};

/// AVX2 and FMA.
pub struct K1_5MixAvx2;

impl Kernel for K1_5MixAvx2 {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        // SAFETY: `kernel` hands out this path only where `Isa::Avx2` is supported.
        unsafe { scores_avx2(block, shape, q, out, stride) }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        PerHead(FormatId::K1_5Mix).accumulate(block, shape, p, stride, out)
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
    let d = shape.d;
    let l = Layout::read(block, d);
    let (dh, dl) = (l.hi.len(), l.lo.len());
    let nh = q.len() / d;
    // Weights of a row [codes of the 2-bit channels, signs of the coefficients], per head.
    let mut w = vec![0f32; nh * d];
    let mut base = vec![0f32; nh];
    let mut wl = vec![0f64; dl];
    for (h, qh) in q.chunks_exact(d).enumerate() {
        let q_lo: Vec<f32> = l.lo.iter().map(|&c| qh[c]).collect();
        adjoint(&q_lo, &mut wl);
        let wh = &mut w[h * d..(h + 1) * d];
        let mut b = 0f64;
        for (j, &c) in l.hi.iter().enumerate() {
            let m = l.minmax(block, j);
            b += qh[c] as f64 * m.lo as f64;
            wh[j] = (qh[c] as f64 * m.step as f64) as f32;
        }
        for k in 0..dl {
            wh[dh + k] = (wl[k] * l.scale(block, k)) as f32;
        }
        base[h] = b as f32;
    }
    let mut row = [0f32; 256];
    let row = &mut row[..d];
    for t in 0..shape.n {
        let codes = &block[l.codes + t * l.stride..];
        unpack::<2>(codes, &mut row[..dh]);
        unpack::<1>(&codes[dh / 4..], &mut row[dh..]);
        row[dh..].iter_mut().for_each(|s| *s = 2.0 * *s - 1.0);
        // SAFETY: AVX2 and FMA are enabled here.
        unsafe { store_dots(&w, &base, row, out, stride, t) };
    }
}
