//! Fast `q2_had` and `q4_had` (see `formats/q2_had.rs`): the query of every head is rotated
//! once per block; each token's codes are decoded once, in the rotated basis, into a row the
//! size of a few registers that every head's dot product reads (`dots8`); sums stay in the
//! rotated basis and are rotated back once per block and head. Plain Rust compiled for AVX2
//! and FMA, which the compiler vectorises, around the one intrinsic reduction.

use super::Kernel;
use super::f16::f16s_to_f32;
use super::rows::{Tile, store_dots};
use crate::kv::Shape;
use crate::kv::formats::q2_had::{Token, codes_at, group_params, groups, rotate, tokens};

/// AVX2 and FMA, at `BITS` bits per code (2: `q2_had`, 4: `q4_had`).
pub struct HadAvx2<const BITS: usize>;

/// The codes of a packed string as numbers, `out.len()` of them.
#[inline(always)]
pub(crate) fn unpack<const BITS: usize>(packed: &[u8], out: &mut [f32]) {
    let per = 8 / BITS;
    let mask = (1u8 << BITS) - 1;
    for (o, &b) in out.chunks_exact_mut(per).zip(packed) {
        for (k, v) in o.iter_mut().enumerate() {
            *v = ((b >> (k * BITS)) & mask) as f32;
        }
    }
}

impl<const BITS: usize> Kernel for HadAvx2<BITS> {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        // SAFETY: `kernel` hands out this path only where `Isa::Avx2` is supported.
        unsafe { scores_avx2::<BITS>(block, shape, q, out, stride) }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        // SAFETY: as in `scores`.
        unsafe { accumulate_avx2::<BITS>(block, shape, p, stride, out) }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2<const BITS: usize>(
    block: &[u8],
    shape: Shape,
    q: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    let d = shape.d;
    let mut qr = q.to_vec();
    qr.chunks_exact_mut(d).for_each(rotate);
    let mut c = [0f32; 256];
    let c = &mut c[..d];
    for (t, tok) in tokens(block, shape, BITS).enumerate() {
        let w = match tok {
            Token::Quantized(rec) => {
                // The token's values in the rotated basis, in registers' worth of floats.
                unpack::<BITS>(&rec[codes_at(d)..], c);
                for (g, r) in groups(d).enumerate() {
                    let mm = group_params(rec, g);
                    c[r].iter_mut().for_each(|v| *v = *v * mm.step + mm.lo);
                }
                &qr
            }
            Token::Protected(row) => {
                f16s_to_f32(row, c);
                q
            }
        };
        // SAFETY: AVX2 and FMA are enabled here.
        unsafe { store_dots(w, &[], c, out, stride, t) };
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2<const BITS: usize>(
    block: &[u8],
    shape: Shape,
    p: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let d = shape.d;
    let nh = out.len() / d;
    // Σ p_t·ŷ_t per head in the rotated basis; protected rows go to `out` directly.
    let mut acc = vec![0f32; nh * d];
    let (mut rotated, mut plain) = (Tile::new(d), Tile::new(d));
    for (t, tok) in tokens(block, shape, BITS).enumerate() {
        match tok {
            Token::Quantized(rec) => {
                let c = rotated.next();
                unpack::<BITS>(&rec[codes_at(d)..], c);
                for (g, r) in groups(d).enumerate() {
                    let mm = group_params(rec, g);
                    c[r].iter_mut().for_each(|v| *v = *v * mm.step + mm.lo);
                }
                rotated.push(t, p, stride, &mut acc);
            }
            Token::Protected(row) => {
                f16s_to_f32(row, plain.next());
                plain.push(t, p, stride, out);
            }
        }
    }
    rotated.flush(p, stride, &mut acc);
    plain.flush(p, stride, out);
    for (ah, oh) in acc.chunks_exact_mut(d).zip(out.chunks_exact_mut(d)) {
        rotate(ah);
        oh.iter_mut().zip(ah.iter()).for_each(|(o, &a)| *o += a);
    }
}
