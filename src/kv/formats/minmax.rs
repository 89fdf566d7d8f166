//! Asymmetric min-max quantization, the building block of KIVI, VidKV's 2-bit channels,
//! protected tokens and AKVQ-VL: `s = (hi - lo) / levels`, `q = round(clamp((x - lo) / s,
//! 0, levels))`, `x̂ = q·s + lo`, with `lo` and `s` stored as f16.

use super::pack::round_f16;

/// The stored (f16-rounded) offset and step of one min-max group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MinMax {
    pub lo: f32,
    pub step: f32,
}

impl MinMax {
    /// Parameters for the range `[lo, hi]` at `levels` = 2^bits − 1. Codes are computed
    /// against the f16-rounded values actually stored, so decoding is exact to them.
    pub fn new(lo: f32, hi: f32, levels: u32) -> MinMax {
        MinMax {
            lo: round_f16(lo),
            step: round_f16((hi - lo) / levels as f32),
        }
    }

    /// The range of `values`, then [`MinMax::new`].
    pub fn over(values: impl Iterator<Item = f32>, levels: u32) -> MinMax {
        let (lo, hi) = fold_range(values);
        MinMax::new(lo, hi, levels)
    }

    /// `levels` must be at most 255.
    #[inline]
    pub fn code(self, x: f32, levels: u32) -> u8 {
        let q = ((x - self.lo) / self.step)
            .clamp(0.0, levels as f32)
            .round();
        // `q as u8` without its saturating conversion, which stays scalar: a NaN is code 0 as
        // there, and a whole `q` in [0, 255] is the low byte of `q + 2^23`'s bits.
        let q = if q >= 0.0 { q } else { 0.0 };
        let code = (q + 8_388_608.0).to_bits() as u8;
        // Computed either way and selected, so that a loop over channels of different steps
        // vectorises too.
        if self.step > 0.0 { code } else { 0 }
    }

    #[inline]
    pub fn value(self, code: u8) -> f32 {
        code as f32 * self.step + self.lo
    }
}

/// `(min, max)` of `values` by a left fold that keeps the first of equal values (so of `-0`
/// and `+0`, whichever comes first; `f32::min` leaves that sign unspecified, and it differs
/// between code compiled with and without AVX) and skips NaNs.
#[inline(always)]
fn fold_range(values: impl Iterator<Item = f32>) -> (f32, f32) {
    values.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
        (pick(v < lo, v, lo), pick(v > hi, v, hi))
    })
}

/// `(min, max)` of `values` as [`fold_range`] finds them, in eight lanes that vectorise; the
/// fold itself only where a zero is the minimum or maximum (the order of a tie between `-0`
/// and `+0` decides its sign), or the length is not a multiple of 8. With AVX the lanes are
/// `vminps`/`vmaxps`, which LLVM does not pick for the portable select (it blends).
#[inline(always)]
pub fn range(values: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present.
        return unsafe { range_avx(values) };
    }
    range_lanes(values)
}

/// Compare-and-select rather than `min`/`max`, whose NaN rules keep them scalar: both skip
/// NaNs, so the value is the same wherever it is not a zero.
#[inline(always)]
fn pick(keep: bool, a: f32, b: f32) -> f32 {
    if keep { a } else { b }
}

/// The eight lanes' `(min, max)` to [`range`]'s answer.
#[inline(always)]
fn finish_range(values: &[f32], lo: [f32; 8], hi: [f32; 8]) -> (f32, f32) {
    let lo = lo.iter().fold(f32::INFINITY, |a, &b| pick(b < a, b, a));
    let hi = hi.iter().fold(f32::NEG_INFINITY, |a, &b| pick(b > a, b, a));
    if lo == 0.0 || hi == 0.0 || !values.len().is_multiple_of(8) {
        return fold_range(values.iter().copied());
    }
    (lo, hi)
}

#[inline(always)]
fn range_lanes(values: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
    for c in values.chunks_exact(8) {
        for i in 0..8 {
            lo[i] = pick(c[i] < lo[i], c[i], lo[i]);
            hi[i] = pick(c[i] > hi[i], c[i], hi[i]);
        }
    }
    finish_range(values, lo, hi)
}

/// [`range_lanes`] in AVX registers: `vminps(v, lo)` is `v < lo ? v : lo`, the same select.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn range_avx(values: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::{
        _mm256_loadu_ps, _mm256_max_ps, _mm256_min_ps, _mm256_set1_ps, _mm256_storeu_ps,
    };
    let (mut lo, mut hi) = (
        _mm256_set1_ps(f32::INFINITY),
        _mm256_set1_ps(f32::NEG_INFINITY),
    );
    for c in values.chunks_exact(8) {
        // SAFETY: `c` holds eight floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        lo = _mm256_min_ps(v, lo);
        hi = _mm256_max_ps(v, hi);
    }
    let (mut lo8, mut hi8) = ([0f32; 8], [0f32; 8]);
    // SAFETY: each array holds eight floats.
    unsafe {
        _mm256_storeu_ps(lo8.as_mut_ptr(), lo);
        _mm256_storeu_ps(hi8.as_mut_ptr(), hi);
    }
    finish_range(values, lo8, hi8)
}

#[cfg(test)]
mod tests {
    use super::{fold_range, range, range_lanes};
    use crate::rng::Rng;

    /// `range` (AVX where present) and the portable lanes are the fold bit for bit: values,
    /// and the sign of a zero that ties.
    #[test]
    fn range_is_the_fold_bit_for_bit() {
        let mut rng = Rng::new(7);
        for len in [8, 16, 24, 64, 5, 13] {
            for _ in 0..200 {
                let mut v = rng.normals(len);
                for x in v.iter_mut() {
                    match rng.below(4) {
                        0 => *x = 0.0,
                        1 => *x = -0.0,
                        2 => *x = x.abs(),
                        _ => {}
                    }
                }
                let want = fold_range(v.iter().copied());
                for got in [range(&v), range_lanes(&v)] {
                    assert_eq!(
                        (got.0.to_bits(), got.1.to_bits()),
                        (want.0.to_bits(), want.1.to_bits())
                    );
                }
            }
        }
    }
}
