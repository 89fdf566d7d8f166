//! The packed-code kernels written once over a vector of lanes ([`Lanes`]) and compiled
//! twice: 8 lanes (AVX2, FMA, F16C) and 16 (AVX-512 F/BW). Every method is
//! `#[inline(always)]`, so it is compiled inside the caller's `#[target_feature]` function.
//!
//! Two shapes of work, both straight from the codes and shared by every query head:
//! - [`token_dots`]: lanes are tokens. The code words of `L` tokens are gathered once; each
//!   code is isolated in place by an `and` (its position's power of two is folded into the
//!   weight beforehand, see [`code_weights`]) and converted, then one FMA per head adds
//!   `w_h[j]·code`. Scores come out as a vector of `L` tokens: no horizontal sums.
//! - [`channel_sums`]: lanes are channels. A token's codes for `L` channels are broadcast,
//!   shifted per lane and masked; one FMA per head adds `p_h[t]·code` to accumulators that
//!   stay in registers over every token of the block.

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::ops::Range;

use crate::kv::Shape;

/// A vector of `L` f32 lanes and its integer twin.
pub(crate) trait Lanes {
    const L: usize;
    type F: Copy;
    type I: Copy;
    /// Runs `job` inside a function compiled for these lanes' features: the kernels' entry.
    unsafe fn run<J: Job>(job: J);
    unsafe fn zero() -> Self::F;
    unsafe fn splat(x: f32) -> Self::F;
    unsafe fn splat_i(x: i32) -> Self::I;
    /// `a·b + c`.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn srl(a: Self::I, n: u32) -> Self::I;
    unsafe fn mullo(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn cvt(a: Self::I) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    unsafe fn store(p: *mut f32, v: Self::F);
    unsafe fn load_i(p: *const i32) -> Self::I;
    /// The 32-bit words at byte offsets `idx` from `base` (unaligned).
    unsafe fn gather(base: *const u8, idx: Self::I) -> Self::I;
    /// The f16 in the low 16 bits of each lane, as f32.
    unsafe fn f16_low(a: Self::I) -> Self::F;
    /// Lane `i`: the `BITS`-bit code `i` of the `L·BITS` bits at `p` (little end first), as a
    /// float divided by lane `i` of [`Lanes::code_unit`].
    unsafe fn codes<const BITS: usize>(p: *const u8) -> Self::F;
    /// What sums of [`Lanes::codes`] are multiplied by: 1, or `2^−(BITS·i)` in lane `i` where
    /// the codes are read in place.
    unsafe fn code_unit<const BITS: usize>() -> Self::F;
    /// Lane `i`: byte `i` of `p`, zero-extended.
    unsafe fn bytes(p: *const u8) -> Self::I;
}

/// A kernel call: [`Lanes::run`] compiles `Job::run` (`#[inline(always)]` in every impl,
/// as everything it calls) inside its `#[target_feature]` function. A closure would not do
/// as the entry: the compiler kept a kernel-sized closure out of line, without the features.
pub(crate) trait Job {
    unsafe fn run<V: Lanes>(self);
}

/// Decodes `L` channels `c..c + L` of row `i` of a block as floats, for [`channel_sums`],
/// lane `i` divided by lane `i` of `unit` ([`Lanes::code_unit`]).
pub(crate) trait Codes {
    unsafe fn at<V: Lanes>(&self, i: usize, c: usize) -> V::F;
    unsafe fn unit<V: Lanes>(&self) -> V::F;
}

/// Rows of `BITS`-bit codes: row `i`'s code of channel `c` at bit `c·BITS` from
/// `base + first + i·stride`.
pub(crate) struct Packed<const BITS: usize> {
    pub(crate) base: *const u8,
    pub(crate) first: usize,
    pub(crate) stride: usize,
}

impl<const BITS: usize> Codes for Packed<BITS> {
    #[inline(always)]
    unsafe fn at<V: Lanes>(&self, i: usize, c: usize) -> V::F {
        // SAFETY: the caller's rows hold the codes of every channel asked.
        unsafe { V::codes::<BITS>(self.base.add(self.first + i * self.stride + c * BITS / 8)) }
    }

    #[inline(always)]
    unsafe fn unit<V: Lanes>(&self) -> V::F {
        // SAFETY: the caller's features.
        unsafe { V::code_unit::<BITS>() }
    }
}

/// AVX2, FMA and F16C: 8 lanes.
pub(crate) struct Avx2;
/// AVX-512 F and BW: 16 lanes.
pub(crate) struct Avx512;

impl Lanes for Avx2 {
    const L: usize = 8;
    type F = __m256;
    type I = __m256i;
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<J: Job>(job: J) {
        // SAFETY: the caller's contract.
        unsafe { job.run::<Self>() }
    }
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn splat_i(x: i32) -> __m256i {
        unsafe { _mm256_set1_epi32(x) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_and_si256(a, b) }
    }
    #[inline(always)]
    unsafe fn srl(a: __m256i, n: u32) -> __m256i {
        unsafe { _mm256_srlv_epi32(a, _mm256_set1_epi32(n as i32)) }
    }
    #[inline(always)]
    unsafe fn mullo(a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_mullo_epi32(a, b) }
    }
    #[inline(always)]
    unsafe fn cvt(a: __m256i) -> __m256 {
        unsafe { _mm256_cvtepi32_ps(a) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_i(p: *const i32) -> __m256i {
        unsafe { _mm256_loadu_si256(p.cast()) }
    }
    #[inline(always)]
    unsafe fn gather(base: *const u8, idx: __m256i) -> __m256i {
        unsafe { _mm256_i32gather_epi32::<1>(base.cast(), idx) }
    }
    #[inline(always)]
    unsafe fn f16_low(a: __m256i) -> __m256 {
        unsafe {
            // The low two bytes of each lane to the low half of its 128-bit lane, then the
            // two halves together.
            let pick = _mm256_setr_epi8(
                0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13,
                -1, -1, -1, -1, -1, -1, -1, -1,
            );
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(a, pick));
            _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
        }
    }
    #[inline(always)]
    unsafe fn codes<const BITS: usize>(p: *const u8) -> __m256 {
        let b = BITS as i32;
        unsafe {
            let bits = read_bits::<Self, BITS>(p);
            let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
            let v = _mm256_srlv_epi32(_mm256_set1_epi32(bits as u32 as i32), shifts);
            _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << BITS) - 1)))
        }
    }
    #[inline(always)]
    unsafe fn code_unit<const BITS: usize>() -> __m256 {
        unsafe { _mm256_set1_ps(1.0) }
    }
    #[inline(always)]
    unsafe fn bytes(p: *const u8) -> __m256i {
        unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast())) }
    }
}

impl Lanes for Avx512 {
    const L: usize = 16;
    type F = __m512;
    type I = __m512i;
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn run<J: Job>(job: J) {
        // SAFETY: the caller's contract.
        unsafe { job.run::<Self>() }
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn splat_i(x: i32) -> __m512i {
        unsafe { _mm512_set1_epi32(x) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
        unsafe { _mm512_and_si512(a, b) }
    }
    #[inline(always)]
    unsafe fn srl(a: __m512i, n: u32) -> __m512i {
        unsafe { _mm512_srlv_epi32(a, _mm512_set1_epi32(n as i32)) }
    }
    #[inline(always)]
    unsafe fn mullo(a: __m512i, b: __m512i) -> __m512i {
        unsafe { _mm512_mullo_epi32(a, b) }
    }
    #[inline(always)]
    unsafe fn cvt(a: __m512i) -> __m512 {
        unsafe { _mm512_cvtepi32_ps(a) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_i(p: *const i32) -> __m512i {
        unsafe { _mm512_loadu_si512(p.cast()) }
    }
    #[inline(always)]
    unsafe fn gather(base: *const u8, idx: __m512i) -> __m512i {
        unsafe { _mm512_i32gather_epi32::<1>(idx, base.cast()) }
    }
    #[inline(always)]
    unsafe fn f16_low(a: __m512i) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm512_cvtepi32_epi16(a)) }
    }
    #[inline(always)]
    unsafe fn codes<const BITS: usize>(p: *const u8) -> __m512 {
        let b = BITS as i32;
        unsafe {
            if BITS == 2 {
                // 16 codes of 2 bits fill one word: each lane keeps its code where it lies,
                // `code·4^i` (exact; unsigned, as lane 15's top bit is the sign), and sums are
                // scaled back once ([`Lanes::code_unit`]): a broadcast load and an `and`
                // instead of a broadcast from a register, a shift and an `and`.
                let word = _mm512_set1_epi32(p.cast::<i32>().read_unaligned());
                let place = |i: u32| (3u32 << (2 * i)) as i32;
                let mask = _mm512_setr_epi32(
                    place(0),
                    place(1),
                    place(2),
                    place(3),
                    place(4),
                    place(5),
                    place(6),
                    place(7),
                    place(8),
                    place(9),
                    place(10),
                    place(11),
                    place(12),
                    place(13),
                    place(14),
                    place(15),
                );
                return _mm512_cvtepu32_ps(_mm512_and_si512(word, mask));
            }
            let bits = read_bits::<Self, BITS>(p);
            // 16 codes of 4 bits span two words: lanes 8..16 read the high one.
            let words = if BITS == 4 {
                let lo = _mm256_set1_epi32(bits as u32 as i32);
                let hi = _mm256_set1_epi32((bits >> 32) as u32 as i32);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            } else {
                _mm512_set1_epi32(bits as u32 as i32)
            };
            let s = |i: i32| (i * b) % 32;
            let shifts = _mm512_setr_epi32(
                s(0),
                s(1),
                s(2),
                s(3),
                s(4),
                s(5),
                s(6),
                s(7),
                s(8),
                s(9),
                s(10),
                s(11),
                s(12),
                s(13),
                s(14),
                s(15),
            );
            let v = _mm512_srlv_epi32(words, shifts);
            _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((1 << BITS) - 1)))
        }
    }
    #[inline(always)]
    unsafe fn code_unit<const BITS: usize>() -> __m512 {
        unsafe {
            if BITS != 2 {
                return _mm512_set1_ps(1.0);
            }
            let u = |i: u32| f32::from_bits((127 - 2 * i) << 23);
            _mm512_setr_ps(
                u(0),
                u(1),
                u(2),
                u(3),
                u(4),
                u(5),
                u(6),
                u(7),
                u(8),
                u(9),
                u(10),
                u(11),
                u(12),
                u(13),
                u(14),
                u(15),
            )
        }
    }
    #[inline(always)]
    unsafe fn bytes(p: *const u8) -> __m512i {
        unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())) }
    }
}

/// What the weight of code `j` of a run is multiplied by for [`token_dots`], at `j % (32 /
/// BITS)`: that code is read in place, `code·2^(BITS·i)` at its position `i` in its 32-bit
/// word, so its weight carries `2^−(BITS·i)` (exact: a power of two). The top code of a word
/// is shifted down instead (an `and` would leave it the sign bit).
pub(crate) const fn code_weights<const BITS: usize>() -> [f32; 32] {
    let per = 32 / BITS;
    let mut w = [1f32; 32];
    let mut i = 0;
    while i + 1 < per {
        w[i] = f32::from_bits((127 - (BITS * i) as u32) << 23);
        i += 1;
    }
    w
}

/// `acc[k][h] += Σ_j w[j·H + h]·s_j·code_j` for `N·L` tokens at once: lane `i` of vector `k`
/// has the `codes` codes of `BITS` bits (`codes·BITS` a multiple of 8) that start at byte
/// `at` of the row at `base + idx[k][i]`. Weights are interleaved by head, each broadcast
/// once for the `N` vectors; the per-code factor `s_j` is `scale[j]`, or 1 when `scale` is
/// empty. One of them carries [`code_weights`]. A run that ends inside a word reads the
/// run's last four bytes instead and shifts them down, so that no read passes the run's end;
/// the row must hold four bytes before that end.
///
/// # Safety
/// The CPU has `V`'s features; every lane's row holds the run; `w` holds `codes·H` weights.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(crate) unsafe fn token_dots<V: Lanes, const H: usize, const BITS: usize, const N: usize>(
    base: *const u8,
    idx: [V::I; N],
    at: usize,
    codes: usize,
    w: &[f32],
    scale: &[f32],
    acc: &mut [[V::F; H]; N],
) {
    let per = 32 / BITS;
    let bytes = codes * BITS / 8;
    debug_assert!(bytes >= 4 || at + bytes >= 4);
    assert!(w.len() >= codes * H && (scale.is_empty() || scale.len() >= codes));
    let scaled = !scale.is_empty();
    // SAFETY: reads stay inside each lane's run (or the row's four bytes before its end);
    // `w` and `scale` hold every factor read (asserted).
    unsafe {
        let mut masks = [V::splat_i(0); 32];
        for (i, m) in masks[..per - 1].iter_mut().enumerate() {
            *m = V::splat_i(((1 << BITS) - 1) << (BITS * i));
        }
        for wd in 0..codes.div_ceil(per) {
            let byte = 4 * wd;
            let mut word = [V::splat_i(0); N];
            for k in 0..N {
                word[k] = if byte + 4 <= bytes {
                    V::gather(base.add(at + byte), idx[k])
                } else {
                    let back = byte + 4 - bytes;
                    V::srl(V::gather(base.add(at + bytes - 4), idx[k]), 8 * back as u32)
                };
            }
            let m = per.min(codes - wd * per);
            let j0 = wd * per;
            let w = w.as_ptr().add(j0 * H);
            for i in 0..m {
                let mut x = [V::zero(); N];
                for k in 0..N {
                    // The top code of a word is shifted down: an `and` would leave it the
                    // sign bit.
                    x[k] = V::cvt(if i + 1 < per {
                        V::and(word[k], masks[i])
                    } else {
                        V::srl(word[k], (32 - BITS) as u32)
                    });
                    if scaled {
                        x[k] = V::mul(x[k], V::splat(*scale.get_unchecked(j0 + i)));
                    }
                }
                for h in 0..H {
                    let wh = V::splat(*w.add(i * H + h));
                    for k in 0..N {
                        acc[k][h] = V::fma(wh, x[k], acc[k][h]);
                    }
                }
            }
        }
    }
}

/// Every value of `x` as a vector: a loop, as `array::map` may stay out of line without the
/// vector features.
#[inline(always)]
pub(crate) unsafe fn splat_each<V: Lanes, const H: usize>(x: &[f32; H]) -> [V::F; H] {
    // SAFETY: the caller's features.
    unsafe {
        let mut v = [V::zero(); H];
        for (v, &x) in v.iter_mut().zip(x) {
            *v = V::splat(x);
        }
        v
    }
}

/// `acc[h] += w[h]·x` for every head.
#[inline(always)]
pub(crate) unsafe fn heads_fma<V: Lanes, const H: usize>(
    x: V::F,
    w: *const f32,
    acc: &mut [V::F; H],
) {
    for (h, a) in acc.iter_mut().enumerate() {
        // SAFETY: the caller's `w` holds `H` weights.
        *a = unsafe { V::fma(V::splat(*w.add(h)), x, *a) };
    }
}

/// Byte offsets `first + (t0 + i)·stride` of `L` rows `t0 + i` for [`token_dots`], lanes
/// from `m` on repeating the last row (their results are dropped).
#[inline(always)]
pub(crate) unsafe fn row_index<V: Lanes>(first: usize, stride: usize, t0: usize, m: usize) -> V::I {
    let mut idx = [0i32; 16];
    for (i, x) in idx[..V::L].iter_mut().enumerate() {
        *x = (first + (t0 + i.min(m - 1)) * stride) as i32;
    }
    // SAFETY: `idx` holds 16 ints.
    unsafe { V::load_i(idx.as_ptr()) }
}

/// Stores the first `out.len()` (≤ `L`) lanes of `v`.
#[inline(always)]
pub(crate) unsafe fn store_lanes<V: Lanes>(out: &mut [f32], v: V::F) {
    if out.len() == V::L {
        // SAFETY: `out` holds `L` floats.
        unsafe { V::store(out.as_mut_ptr(), v) }
    } else {
        let mut tmp = [0f32; 16];
        // SAFETY: `tmp` holds 16 floats.
        unsafe { V::store(tmp.as_mut_ptr(), v) };
        out.copy_from_slice(&tmp[..out.len()]);
    }
}

/// `out[h·d + c] += Σ_i w[i·H + h]·code_i(c)` for the channels `c` of `channels` (start
/// and length multiples of `L`), over the `m` rows of `codes`: `2L` channels at a time (then
/// `L`), every row, with the heads' accumulators in registers. Weights are interleaved by
/// head; each is broadcast once for both vectors of channels (an FMA whose weight is loaded
/// by broadcast runs at about half the rate of one from a register).
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
pub(crate) unsafe fn channel_sums<V: Lanes, const H: usize>(
    channels: Range<usize>,
    m: usize,
    codes: &impl Codes,
    w: &[f32],
    out: &mut [f32],
    d: usize,
) {
    assert!(w.len() >= m * H);
    assert!(channels.end <= d && out.len() >= H * d);
    let mut c0 = channels.start;
    // SAFETY: the caller's contract; `w` and `out` are long enough (asserted above).
    unsafe {
        while c0 + 2 * V::L <= channels.end {
            channel_slab::<V, H, 2>(c0, m, codes, w, out, d);
            c0 += 2 * V::L;
        }
        if c0 < channels.end {
            channel_slab::<V, H, 1>(c0, m, codes, w, out, d);
        }
    }
}

/// Channels `c0..c0 + N·L` of [`channel_sums`]: `N·H` accumulators.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `acc[k][h]`: one broadcast of `w` serves every `k`.
unsafe fn channel_slab<V: Lanes, const H: usize, const N: usize>(
    c0: usize,
    m: usize,
    codes: &impl Codes,
    w: &[f32],
    out: &mut [f32],
    d: usize,
) {
    // SAFETY: the caller's contract. Plain loops over `k`, not `array::map`: a generic
    // call the compiler may keep out of line, without the vector features.
    unsafe {
        let mut acc = [[V::zero(); H]; N];
        for i in 0..m {
            let mut x = [V::zero(); N];
            for (k, x) in x.iter_mut().enumerate() {
                *x = codes.at::<V>(i, c0 + k * V::L);
            }
            for h in 0..H {
                let wh = V::splat(*w.get_unchecked(i * H + h));
                for k in 0..N {
                    acc[k][h] = V::fma(wh, x[k], acc[k][h]);
                }
            }
        }
        let unit = codes.unit::<V>();
        for (k, acc) in acc.iter().enumerate() {
            for (h, a) in acc.iter().enumerate() {
                let o = out.as_mut_ptr().add(h * d + c0 + k * V::L);
                V::store(o, V::fma(*a, unit, V::load(o)));
            }
        }
    }
}

/// The `L·BITS` bits of `L` codes from `p` (little end first), read without passing them.
#[inline(always)]
pub(crate) unsafe fn read_bits<V: Lanes, const BITS: usize>(p: *const u8) -> u64 {
    // SAFETY: the caller's row holds the `L·BITS / 8` bytes read.
    unsafe {
        match V::L * BITS / 8 {
            1 => *p as u64,
            2 => p.cast::<u16>().read_unaligned() as u64,
            4 => p.cast::<u32>().read_unaligned() as u64,
            _ => p.cast::<u64>().read_unaligned(),
        }
    }
}

/// The `(lo, step)` f16 pairs of `L` rows at byte offsets `idx` from `base`.
#[inline(always)]
pub(crate) unsafe fn pairs<V: Lanes>(base: *const u8, idx: V::I) -> (V::F, V::F) {
    // SAFETY: the caller's rows hold the pairs.
    unsafe {
        let v = V::gather(base, idx);
        (V::f16_low(v), V::f16_low(V::srl(v, 16)))
    }
}

/// Row `i`'s codes times `scale[i]`: a per-token step on the codes, shared by every head.
pub(crate) struct Scaled<'a, C> {
    pub(crate) codes: C,
    pub(crate) scale: &'a [f32],
}

impl<C: Codes> Codes for Scaled<'_, C> {
    #[inline(always)]
    unsafe fn at<V: Lanes>(&self, i: usize, c: usize) -> V::F {
        // SAFETY: the caller's contract; `scale` holds a factor per row.
        unsafe { V::mul(self.codes.at::<V>(i, c), V::splat(self.scale[i])) }
    }

    #[inline(always)]
    unsafe fn unit<V: Lanes>(&self) -> V::F {
        // SAFETY: the caller's features.
        unsafe { self.codes.unit::<V>() }
    }
}

/// The softmax weights of `m` rows interleaved by head for [`channel_sums`]:
/// `w[i·H + h] = p[h·p_stride + tok_i]`, `tok_i` the row's token (`tok[i]`, or `i` when `tok`
/// is empty).
pub(crate) fn row_weights<const H: usize>(
    p: &[f32],
    p_stride: usize,
    tok: &[usize],
    m: usize,
) -> Vec<f32> {
    let mut w = vec![0f32; m * H];
    for (i, wi) in w.chunks_exact_mut(H).enumerate() {
        let t = if tok.is_empty() { i } else { tok[i] };
        for (h, x) in wi.iter_mut().enumerate() {
            *x = p[h * p_stride + t];
        }
    }
    w
}

/// The steps of a min-max group, `step[i]`, for the `m` rows whose `(lo, step)` pair is at
/// `base + first + i·stride`. Returns `Σ_i p_h·lo_i` per head with
/// `p_h = p[h·p_stride + tok_i]` (as in [`row_weights`]): what the offsets add to every
/// channel of the group.
///
/// # Safety
/// The CPU has `V`'s features; every pair lies in the caller's block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn group_steps<V: Lanes, const H: usize>(
    base: *const u8,
    first: usize,
    stride: usize,
    tok: &[usize],
    m: usize,
    p: &[f32],
    p_stride: usize,
    step: &mut [f32],
) -> [f32; H] {
    assert!(step.len() >= m);
    assert!(!tok.is_empty() || m == 0 || p.len() >= (H - 1) * p_stride + m);
    // SAFETY: the caller's contract; lanes past `mt` weigh 0.
    unsafe {
        let mut lo_sum = [V::zero(); H];
        for i0 in (0..m).step_by(V::L) {
            let mt = V::L.min(m - i0);
            let (lo, s) = pairs::<V>(base, row_index::<V>(first, stride, i0, mt));
            store_lanes::<V>(&mut step[i0..i0 + mt], s);
            for (h, ls) in lo_sum.iter_mut().enumerate() {
                let pv = if tok.is_empty() && mt == V::L {
                    V::load(p.as_ptr().add(h * p_stride + i0))
                } else {
                    let mut pt = [0f32; 16];
                    for (i, x) in pt[..mt].iter_mut().enumerate() {
                        let t = if tok.is_empty() { i0 + i } else { tok[i0 + i] };
                        *x = p[h * p_stride + t];
                    }
                    V::load(pt.as_ptr())
                };
                *ls = V::fma(pv, lo, *ls);
            }
        }
        // A loop, not `array::map`: the compiler kept that generic call out of line, where
        // the vector features are off, and paid a call per element.
        let mut sums = [0f32; H];
        for (sum, v) in sums.iter_mut().zip(lo_sum) {
            let mut s = [0f32; 16];
            V::store(s.as_mut_ptr(), v);
            *sum = s[..V::L].iter().sum();
        }
        sums
    }
}

/// Query heads per pass of a kernel: their accumulators stay in registers.
const HEADS: usize = 7;

/// A format's scores on any lanes, for up to [`HEADS`] heads (`H`); `#[inline(always)]`.
pub(crate) trait Scores {
    unsafe fn scores<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        q: &[f32],
        out: &mut [f32],
        stride: usize,
    );
}

/// A format's sums on any lanes, for up to [`HEADS`] heads (`H`); `#[inline(always)]`.
pub(crate) trait Sums {
    unsafe fn sums<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        p: &[f32],
        stride: usize,
        out: &mut [f32],
    );
}

/// Calls `$f::<V, H>(args)` with `H = $nh` (1..=7).
macro_rules! heads {
    ($nh:expr, $t:ident::$f:ident::<$v:ident>($($a:expr),*)) => {
        match $nh {
            1 => $t::$f::<$v, 1>($($a),*),
            2 => $t::$f::<$v, 2>($($a),*),
            3 => $t::$f::<$v, 3>($($a),*),
            4 => $t::$f::<$v, 4>($($a),*),
            5 => $t::$f::<$v, 5>($($a),*),
            6 => $t::$f::<$v, 6>($($a),*),
            _ => $t::$f::<$v, 7>($($a),*),
        }
    };
}

struct ScoresJob<'a, S> {
    block: &'a [u8],
    shape: Shape,
    q: &'a [f32],
    out: &'a mut [f32],
    stride: usize,
    format: PhantomData<S>,
}

impl<S: Scores> Job for ScoresJob<'_, S> {
    #[inline(always)]
    unsafe fn run<V: Lanes>(self) {
        let Self {
            block,
            shape,
            q,
            out,
            stride,
            ..
        } = self;
        // SAFETY: the caller's contract.
        unsafe {
            heads!(
                q.len() / shape.d,
                S::scores::<V>(block, shape, q, out, stride)
            )
        }
    }
}

struct SumsJob<'a, S> {
    block: &'a [u8],
    shape: Shape,
    p: &'a [f32],
    stride: usize,
    out: &'a mut [f32],
    format: PhantomData<S>,
}

impl<S: Sums> Job for SumsJob<'_, S> {
    #[inline(always)]
    unsafe fn run<V: Lanes>(self) {
        let Self {
            block,
            shape,
            p,
            stride,
            out,
            ..
        } = self;
        // SAFETY: the caller's contract.
        unsafe {
            heads!(
                out.len() / shape.d,
                S::sums::<V>(block, shape, p, stride, out)
            )
        }
    }
}

/// [`Kernel::scores`](super::Kernel::scores) of `S` on lanes `V`, in passes of at most
/// [`HEADS`] heads.
///
/// # Safety
/// The CPU has `V`'s features.
pub(crate) unsafe fn scores<V: Lanes, S: Scores>(
    block: &[u8],
    shape: Shape,
    q: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    for (pass, q) in q.chunks(HEADS * shape.d).enumerate() {
        let out = &mut out[pass * HEADS * stride..];
        let job = ScoresJob::<S> {
            block,
            shape,
            q,
            out,
            stride,
            format: PhantomData,
        };
        // SAFETY: the caller's contract.
        unsafe { V::run(job) }
    }
}

/// [`Kernel::accumulate`](super::Kernel::accumulate) of `S` on lanes `V`, in passes of at
/// most [`HEADS`] heads.
///
/// # Safety
/// The CPU has `V`'s features.
pub(crate) unsafe fn sums<V: Lanes, S: Sums>(
    block: &[u8],
    shape: Shape,
    p: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    for (pass, out) in out.chunks_mut(HEADS * shape.d).enumerate() {
        let p = &p[pass * HEADS * stride..];
        let job = SumsJob::<S> {
            block,
            shape,
            p,
            stride,
            out,
            format: PhantomData,
        };
        // SAFETY: the caller's contract.
        unsafe { V::run(job) }
    }
}
