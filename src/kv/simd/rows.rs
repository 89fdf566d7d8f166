//! Helpers of kernels that decode one token at a time into a row of floats (a few registers'
//! worth, on the stack) and serve every query head from it: the dot products of scores and
//! the weighted sums of values. Compiled inside the kernels' AVX2 functions.

/// `w_h · row` for up to 8 heads (`w` is `[nh][d]`, `d` a multiple of 8): the per-token step
/// of kernels that decode a token's row into registers' worth of floats and serve every head.
///
/// # Safety
/// AVX2 and FMA must be present.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dots8(w: &[f32], row: &[f32]) -> [f32; 8] {
    use std::arch::x86_64::*;
    let d = row.len();
    let nh = w.len() / d;
    debug_assert!(nh <= 8 && d % 8 == 0);
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        // SAFETY: `c + 8 <= d`; unaligned loads.
        let x = unsafe { _mm256_loadu_ps(row.as_ptr().add(c)) };
        for (h, a) in acc[..nh].iter_mut().enumerate() {
            // SAFETY: `h * d + c + 8 <= w.len()`.
            let wv = unsafe { _mm256_loadu_ps(w.as_ptr().add(h * d + c)) };
            *a = _mm256_fmadd_ps(x, wv, *a);
        }
    }
    // Horizontal sums of the eight accumulators at once.
    let s01 = _mm256_hadd_ps(acc[0], acc[1]);
    let s23 = _mm256_hadd_ps(acc[2], acc[3]);
    let s45 = _mm256_hadd_ps(acc[4], acc[5]);
    let s67 = _mm256_hadd_ps(acc[6], acc[7]);
    let s0123 = _mm256_hadd_ps(s01, s23);
    let s4567 = _mm256_hadd_ps(s45, s67);
    let lo = _mm256_permute2f128_ps::<0x20>(s0123, s4567);
    let hi = _mm256_permute2f128_ps::<0x31>(s0123, s4567);
    let mut out = [0f32; 8];
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi)) };
    out
}

/// `out[h·stride + t] = base[h] + w_h · row` for every head of `w` (`[nh][d]`).
///
/// # Safety
/// AVX2 and FMA must be present.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn store_dots(
    w: &[f32],
    base: &[f32],
    row: &[f32],
    out: &mut [f32],
    stride: usize,
    t: usize,
) {
    let d = row.len();
    for (pass, wp) in w.chunks(8 * d).enumerate() {
        // SAFETY: AVX2 and FMA, as this function.
        let s = unsafe { dots8(wp, row) };
        for (i, &v) in s[..wp.len() / d].iter().enumerate() {
            let h = pass * 8 + i;
            out[h * stride + t] = base.get(h).copied().unwrap_or(0.0) + v;
        }
    }
}

/// `acc_h += p[h·stride + t] · row` for every head of `acc` (`[nh][d]`).
#[inline(always)]
pub(crate) fn axpy_heads(acc: &mut [f32], p: &[f32], stride: usize, t: usize, row: &[f32]) {
    for (h, ah) in acc.chunks_exact_mut(row.len()).enumerate() {
        let pt = p[h * stride + t];
        ah.iter_mut().zip(row).for_each(|(a, &v)| *a += pt * v);
    }
}

/// A format whose tokens decode one at a time into their values (a row of `d` floats): its
/// fast kernels are [`RowKernel`].
pub(crate) trait DecodeRow: Sync {
    /// Values of token `t` of the block into `out` (`d` floats).
    fn row(&self, block: &[u8], d: usize, t: usize, out: &mut [f32]);
}

/// Scores and sums of a [`DecodeRow`] format, every head served by one decode of each row.
pub struct RowKernel<R>(pub(crate) R);

impl<R: DecodeRow> super::Kernel for RowKernel<R> {
    fn scores(
        &self,
        block: &[u8],
        shape: crate::kv::Shape,
        q: &[f32],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: `kernel` hands out this path only where `Isa::Avx2` is supported.
        unsafe { row_scores(&self.0, block, shape.n, shape.d, q, out, stride) }
    }

    fn accumulate(
        &self,
        block: &[u8],
        shape: crate::kv::Shape,
        p: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        // SAFETY: as in `scores`.
        unsafe { row_sums(&self.0, block, shape.n, shape.d, p, stride, out) }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn row_scores<R: DecodeRow>(
    r: &R,
    block: &[u8],
    n: usize,
    d: usize,
    q: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    let mut row = [0f32; 256];
    let row = &mut row[..d];
    for t in 0..n {
        r.row(block, d, t, row);
        // SAFETY: AVX2 and FMA are enabled here.
        unsafe { store_dots(q, &[], row, out, stride, t) };
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn row_sums<R: DecodeRow>(
    r: &R,
    block: &[u8],
    n: usize,
    d: usize,
    p: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let mut row = [0f32; 256];
    let row = &mut row[..d];
    for t in 0..n {
        r.row(block, d, t, row);
        axpy_heads(out, p, stride, t, row);
    }
}
