//! The exponentials of the online softmax: `x ← exp(x − max x)`, vectorised. At 65536 tokens
//! and 28 query heads a decode step takes 1.8 million of them, which libm would spend
//! milliseconds on.

use super::Isa;

/// In place `x[i] ← exp(x[i] − m)` with `m = max x`; returns `(m, Σ x[i])` after the update.
/// `x` must be non-empty and finite.
pub fn exp_shifted(x: &mut [f32], isa: Isa) -> (f32, f32) {
    let m = min_max(x, isa).1;
    (m, exp_scaled(x, 1.0, m, isa))
}

/// In place `x[i] ← exp(a·(x[i] − m))`; returns `Σ x[i]` after the update. With `m = max x`
/// and `a` CalibQuant's slope this is the softmax numerator of calibrated logits (an affine
/// map `y = lo + a·(x − lo)`, whose maximum is the map of `max x`), without writing them.
pub fn exp_scaled(x: &mut [f32], a: f32, m: f32, isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `isa` is only ever a path `Isa::supported` confirmed on this CPU.
        Isa::Avx512 => return unsafe { x86::exp_scaled_avx512(x, a, m) },
        Isa::Avx2 => return unsafe { x86::exp_scaled_avx2(x, a, m) },
        Isa::Scalar => {}
    }
    let _ = isa;
    let mut sum = 0.0;
    for w in x.iter_mut() {
        *w = (a * (*w - m)).exp();
        sum += *w;
    }
    sum
}

/// CalibQuant's slope: the factor by which calibration shrinks a span's logit range
/// `[lo, hi]` onto `[lo, hi − δ]` (1 for a span no wider than `δ`).
pub fn calibration_slope(lo: f32, hi: f32, delta: f32) -> f32 {
    let range = hi - lo;
    if range > delta {
        (range - delta) / range
    } else {
        1.0
    }
}

/// `(min x, max x)` of finite values: the range CalibQuant's calibration maps.
pub fn min_max(x: &[f32], isa: Isa) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa` is only ever a path `Isa::supported` confirmed on this CPU.
        return unsafe { x86::min_max_avx2(x) };
    }
    let _ = isa;
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// CalibQuant's calibration of (part of) a span whose logits range over `[lo, hi]`: maps
/// them onto `[lo, hi − δ]`, keeping their order; a span whose range is at most `δ` is left as
/// it is. The same arithmetic on every path.
pub fn calibrate(x: &mut [f32], lo: f32, hi: f32, delta: f32, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa` is only ever a path `Isa::supported` confirmed on this CPU.
        return unsafe { x86::calibrate_avx2(x, lo, hi, delta) };
    }
    let _ = isa;
    calibrate_scalar(x, lo, hi, delta)
}

#[inline(always)]
fn calibrate_scalar(x: &mut [f32], lo: f32, hi: f32, delta: f32) {
    if hi - lo > delta {
        let s = calibration_slope(lo, hi, delta);
        x.iter_mut().for_each(|v| *v = lo + (*v - lo) * s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    // Cephes' expf: exp(x) = 2^n · exp(r), r = x − n·ln 2 in two parts, exp(r) by a degree-5
    // polynomial; relative error about 1e-7, as libm's to the order that matters here.
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    /// Below this the result would be subnormal: clamp (the softmax weight is ~1e-38, zero for
    /// any sum it joins, as the maximum's weight is 1).
    const LO: f32 = -87.0;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp256(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(LO));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C1), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C2), r);
        let mut y = _mm256_set1_ps(P[0]);
        for &p in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(LO));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C1), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C2), r);
        let mut y = _mm512_set1_ps(P[0]);
        for &p in &P[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p));
        }
        let y = _mm512_fmadd_ps(
            y,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(y, _mm512_castsi512_ps(e))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn hmax256(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// [`calibrate`](super::calibrate), vectorised by the compiler.
    #[target_feature(enable = "avx2")]
    pub(super) fn calibrate_avx2(x: &mut [f32], lo: f32, hi: f32, delta: f32) {
        super::calibrate_scalar(x, lo, hi, delta)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn min_max_avx2(x: &[f32]) -> (f32, f32) {
        let (body, tail) = x.split_at(x.len() / 8 * 8);
        let mut lo = _mm256_set1_ps(f32::INFINITY);
        let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(8) {
            // SAFETY: `c` holds 8 floats; unaligned load.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
        }
        let neg = _mm256_sub_ps(_mm256_setzero_ps(), lo);
        tail.iter()
            .fold((-hmax256(neg), hmax256(hi)), |(l, h), &v| {
                (l.min(v), h.max(v))
            })
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_scaled_avx2(x: &mut [f32], a: f32, m: f32) -> f32 {
        let (body, tail) = x.split_at_mut(x.len() / 8 * 8);
        let (vm, va, mut vs) = (_mm256_set1_ps(m), _mm256_set1_ps(a), _mm256_setzero_ps());
        for c in body.chunks_exact_mut(8) {
            // SAFETY: `c` holds 8 floats; unaligned load and store.
            unsafe {
                let e = exp256(_mm256_mul_ps(
                    va,
                    _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vm),
                ));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                vs = _mm256_add_ps(vs, e);
            }
        }
        let mut sum = hsum256(vs);
        for w in tail {
            *w = (a * (*w - m)).exp();
            sum += *w;
        }
        sum
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_scaled_avx512(x: &mut [f32], a: f32, m: f32) -> f32 {
        let (body, tail) = x.split_at_mut(x.len() / 16 * 16);
        let (vm, va, mut vs) = (_mm512_set1_ps(m), _mm512_set1_ps(a), _mm512_setzero_ps());
        for c in body.chunks_exact_mut(16) {
            // SAFETY: `c` holds 16 floats; unaligned load and store.
            unsafe {
                let e = exp512(_mm512_mul_ps(
                    va,
                    _mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), vm),
                ));
                _mm512_storeu_ps(c.as_mut_ptr(), e);
                vs = _mm512_add_ps(vs, e);
            }
        }
        let mut sum = _mm512_reduce_add_ps(vs);
        for w in tail {
            *w = (a * (*w - m)).exp();
            sum += *w;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::hsum256;
