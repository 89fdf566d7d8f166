//! Fast `f16` (see `formats/f16.rs`): rows converted by F16C eight at a time and multiplied
//! into every query head's accumulator while in registers. It is the baseline every speed
//! ratio is taken against, so it gets the same care as the 1-bit paths. AVX-512 machines use
//! it too: the f16 path is bound by memory, not by vector width.

use super::Kernel;
use crate::kv::Shape;

/// F16C, AVX2 and FMA.
pub struct F16Avx2;

/// Query heads served per pass over a block: 7 (Qwen2.5-VL's group) keeps 14 accumulators and
/// the row in the 16 ymm registers; `by_heads!` goes no higher.
const HEADS: usize = 7;

impl Kernel for F16Avx2 {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        let d = shape.d;
        let rows = &block[..2 * shape.n * d];
        for (pass, qp) in q.chunks(HEADS * d).enumerate() {
            let out = &mut out[pass * HEADS * stride..];
            // SAFETY: `kernel` hands out this path only where `Isa::Avx2` is supported; the
            // lengths are checked inside.
            unsafe { x86::scores(rows, d, qp, out, stride) }
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        let d = shape.d;
        let rows = &block[..2 * shape.n * d];
        for (pass, op) in out.chunks_mut(HEADS * d).enumerate() {
            let p = &p[pass * HEADS * stride..];
            // SAFETY: as in `scores`.
            unsafe { x86::accumulate(rows, d, p, stride, op) }
        }
    }
}

/// Little-endian f16 `bytes` into `out` (as long), eight at a time by F16C where this CPU has
/// it (every caller is an AVX2 kernel).
pub fn f16s_to_f32(bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::Isa::Avx2.supported() {
        // SAFETY: F16C checked just above.
        return unsafe { x86::f16s_to_f32(bytes, out) };
    }
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

/// Appends `x` to `out` as little-endian f16, rounded to nearest even (as `half` and the
/// reference do), eight at a time by F16C where this CPU has it.
pub fn f32s_to_f16(x: &[f32], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if super::Isa::Avx2.supported() {
        // SAFETY: F16C checked just above.
        return unsafe { x86::f32s_to_f16(x, out) };
    }
    x.iter()
        .for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::kv::simd::rows::slab_sums;
    use crate::kv::simd::softmax::hsum256;

    /// Eight channels of a row of little-endian f16, as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn load8(row: &[u8], c: usize) -> __m256 {
        let b = &row[2 * c..2 * c + 16];
        // SAFETY: `b` holds 16 bytes; unaligned load.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn f16s_to_f32(bytes: &[u8], out: &mut [f32]) {
        let (body, tail) = out.split_at_mut(out.len() / 8 * 8);
        for (i, o) in body.chunks_exact_mut(8).enumerate() {
            // SAFETY: `o` holds 8 floats; unaligned store.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), load8(bytes, 8 * i)) };
        }
        let at = body.len();
        for (j, o) in tail.iter_mut().enumerate() {
            let b = &bytes[2 * (at + j)..];
            *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn f32s_to_f16(x: &[f32], out: &mut Vec<u8>) {
        out.reserve(2 * x.len());
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            // SAFETY: `c` holds 8 floats; unaligned load.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            let mut b = [0u8; 16];
            // SAFETY: `b` holds 16 bytes; unaligned store.
            unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), h) };
            out.extend_from_slice(&b);
        }
        tail.iter()
            .for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()));
    }

    /// Up to [`HEADS`] heads (`q.len() / d`) against every row of `rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scores(rows: &[u8], d: usize, q: &[f32], out: &mut [f32], stride: usize) {
        by_heads!(q.len() / d, scores_h(rows, d, q, out, stride))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scores_h<const H: usize>(rows: &[u8], d: usize, q: &[f32], out: &mut [f32], stride: usize) {
        let q = &q[..H * d];
        for (t, row) in rows.chunks_exact(2 * d).enumerate() {
            let mut acc = [_mm256_setzero_ps(); H];
            for c in (0..d).step_by(8) {
                let x = load8(row, c);
                for (h, a) in acc.iter_mut().enumerate() {
                    let qv = &q[h * d + c..h * d + c + 8];
                    // SAFETY: `qv` holds 8 floats; unaligned load.
                    *a = _mm256_fmadd_ps(x, unsafe { _mm256_loadu_ps(qv.as_ptr()) }, *a);
                }
            }
            for (h, a) in acc.into_iter().enumerate() {
                out[h * stride + t] = hsum256(a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn accumulate(rows: &[u8], d: usize, p: &[f32], stride: usize, out: &mut [f32]) {
        by_heads!(out.len() / d, accumulate_h(rows, d, p, stride, out))
    }

    /// Sixteen channels at a time (two vectors per head), every row, then the next sixteen:
    /// the block is small enough to be re-read from L1/L2.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn accumulate_h<const H: usize>(
        rows: &[u8],
        d: usize,
        p: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        let n = rows.len() / (2 * d);
        let out = &mut out[..H * d];
        for h in 0..H {
            assert!(h * stride + n <= p.len());
        }
        let load = |t: usize, c: usize| {
            let row = &rows[t * 2 * d..(t + 1) * 2 * d];
            (load8(row, c), load8(row, c + 8))
        };
        // SAFETY: AVX2, FMA and F16C enabled here; every weight read asserted above.
        unsafe { slab_sums::<H>(d, n, load, |t| t, p, stride, out) }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) unsafe fn scores(_: &[u8], _: usize, _: &[f32], _: &mut [f32], _: usize) {
        unreachable!("x86 kernels are never dispatched elsewhere")
    }
    pub(super) unsafe fn accumulate(_: &[u8], _: usize, _: &[f32], _: usize, _: &mut [f32]) {
        unreachable!("x86 kernels are never dispatched elsewhere")
    }
}
