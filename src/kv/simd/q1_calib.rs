//! Fast `q1_calib` (see `formats/q1_calib.rs`): scores and sums straight from the bits.
//!
//! Scores, `base + Σ_c w_c·bit_tc` with `w_c = q_c·(hi_c − lo_c)`: per query head and block,
//! a 16-entry table per nibble of channels (the sums of every subset of its four `w`), held in
//! a vector register and indexed by a vector permute whose lanes are tokens; the code words
//! of 16 (AVX-512) or 8 (AVX2) tokens are gathered once and serve every head of the group.
//!
//! Sums, `out_c += lo_c·Σ_t p_t + (hi_c − lo_c)·Σ_t p_t·bit_tc`: lanes are channels, the bits
//! of a token are the lane mask of an add of its broadcast weight (AVX-512 mask registers
//! take them as they are stored, and half the adds are FMAs by one to use the multiply
//! pipes too; AVX2 expands each byte to eight 0/1 floats for an FMA).

use super::f16::f16s_to_f32;
use super::{Kernel, dot, sum};
use crate::kv::Shape;

/// AVX-512 F/BW.
pub struct Q1CalibAvx512;
/// AVX2 and FMA.
pub struct Q1CalibAvx2;

/// Query heads per pass: tables and accumulators of 7 heads (Qwen2.5-VL's group) fit.
const HEADS: usize = 7;
/// The largest head dim.
const MAX_D: usize = 256;

/// A block's stored ranges as f32: `lo` and `hi − lo`.
struct Ranges {
    lo: [f32; MAX_D],
    span: [f32; MAX_D],
}

#[inline]
fn ranges(block: &[u8], d: usize) -> Ranges {
    let mut r = Ranges {
        lo: [0.0; MAX_D],
        span: [0.0; MAX_D],
    };
    let mut hi = [0f32; MAX_D];
    f16s_to_f32(&block[..2 * d], &mut r.lo[..d]);
    f16s_to_f32(&block[2 * d..4 * d], &mut hi[..d]);
    for ((s, &h), &l) in r.span[..d].iter_mut().zip(&hi[..d]).zip(&r.lo[..d]) {
        *s = h - l;
    }
    r
}

/// Per head of a pass: `base = q·lo` and `w = q·(hi − lo)`.
#[inline]
fn weights(r: &Ranges, q: &[f32], d: usize, base: &mut [f32; HEADS], w: &mut [f32]) {
    for (h, qh) in q.chunks_exact(d).enumerate() {
        base[h] = dot(qh, &r.lo[..d]);
        for ((w, &x), &s) in w[h * d..(h + 1) * d].iter_mut().zip(qh).zip(&r.span[..d]) {
            *w = x * s;
        }
    }
}

impl Kernel for Q1CalibAvx512 {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        // SAFETY: `kernel` hands out this path only where its `Isa` (AVX2 at least) is supported.
        unsafe { scores(block, shape, q, out, stride, true) }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        // SAFETY: as for `scores`.
        unsafe { accumulate(block, shape, p, stride, out, true) }
    }
}

impl Kernel for Q1CalibAvx2 {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        // SAFETY: `kernel` hands out this path only where its `Isa` (AVX2 at least) is supported.
        unsafe { scores(block, shape, q, out, stride, false) }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        // SAFETY: as for `scores`.
        unsafe { accumulate(block, shape, p, stride, out, false) }
    }
}

/// Compiled for AVX2, as every caller runs: the per-block work around the kernels (ranges,
/// weights, sums of weights) is vectorised too.
#[target_feature(enable = "avx2,fma,f16c")]
fn scores(block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize, wide: bool) {
    let (n, d) = (shape.n, shape.d);
    let r = ranges(block, d);
    let bits = &block[4 * d..4 * d + n * d / 8];
    let mut base = [0f32; HEADS];
    let mut w = [0f32; HEADS * MAX_D];
    for (pass, qp) in q.chunks(HEADS * d).enumerate() {
        let nh = qp.len() / d;
        weights(&r, qp, d, &mut base, &mut w);
        let out = &mut out[pass * HEADS * stride..];
        let rows = BitRows {
            bytes: bits,
            first: 0,
            stride: d / 8,
            len: d / 8,
        };
        // SAFETY: `kernel` hands out each path only where its `Isa` is supported.
        unsafe {
            bit_scores(
                &rows,
                n,
                &w[..nh * d],
                &base[..nh],
                false,
                out,
                stride,
                wide,
            )
        }
    }
}

/// Where the 1-bit codes of a block's tokens lie: token `t`'s `8·len` codes from byte `first`
/// of its row at `t·stride`, code `c` at bit `c % 8` of byte `c / 8`. A run shorter than four
/// bytes needs four bytes of its row before its end.
pub(super) struct BitRows<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) first: usize,
    pub(super) stride: usize,
    pub(super) len: usize,
}

/// `out[h·stride + t] = base_h + Σ_c w[h·8·len + c]·bit_tc` for the `n` tokens of `rows` and
/// the heads of `base` (at most [`HEADS`]), plus what `out` held where `add`: the scores of
/// q1_calib, and the sign bits of k1_5_mix's coefficients on top of its 2-bit codes'.
///
/// # Safety
/// The CPU has AVX-512 F/BW (`wide`) or AVX2 and FMA. The reads and writes are checked: a
/// `rows` or `out` too short for `n` tokens panics.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn bit_scores(
    rows: &BitRows,
    n: usize,
    w: &[f32],
    base: &[f32],
    add: bool,
    out: &mut [f32],
    stride: usize,
    wide: bool,
) {
    assert!(n == 0 || (n - 1) * rows.stride + rows.first + rows.len <= rows.bytes.len());
    assert!(rows.len >= 4 || rows.first + rows.len >= 4);
    assert!(w.len() >= base.len() * 8 * rows.len && base.len() <= HEADS);
    assert!(rows.len * 8 <= MAX_D);
    for h in 0..base.len() {
        assert!(h * stride + n <= out.len());
    }
    // SAFETY: the caller's features; the reads and writes asserted above.
    unsafe {
        if wide {
            x86::scores512(rows, n, w, base, add, out, stride)
        } else {
            x86::scores256(rows, n, w, base, add, out, stride)
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn accumulate(block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32], wide: bool) {
    let (n, d) = (shape.n, shape.d);
    let r = ranges(block, d);
    let bits = &block[4 * d..4 * d + n * d / 8];
    for (pass, op) in out.chunks_mut(HEADS * d).enumerate() {
        let nh = op.len() / d;
        let p = &p[pass * HEADS * stride..];
        let mut psum = [0f32; HEADS];
        for (h, ps) in psum[..nh].iter_mut().enumerate() {
            *ps = sum(&p[h * stride..h * stride + n]);
        }
        let sums = Sums {
            lo: &r.lo[..d],
            span: &r.span[..d],
            psum: &psum[..nh],
        };
        // SAFETY: as in `scores`; `p` holds every row read (checked by `sum` above).
        unsafe {
            if wide {
                x86::sums512(bits, n, d, p, stride, &sums, op)
            } else {
                x86::sums256(bits, n, d, p, stride, &sums, op)
            }
        }
    }
}

/// What turns the bit sums `a_c = Σ_t p_t·bit_tc` of a head into its output:
/// `out_c += lo_c·psum + span_c·a_c`.
struct Sums<'a> {
    lo: &'a [f32],
    span: &'a [f32],
    /// `Σ_t p_t` per head.
    psum: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{BitRows, HEADS, MAX_D, Sums};

    /// Where word `wd` of a token's run of codes is read (bytes from its row's start), the
    /// bits its codes are shifted down by, and how many codes it holds (bit `j` is code
    /// `32·wd + j` either way): a run that ends inside a word reads the run's last four
    /// bytes, so that no read passes the run.
    #[inline]
    fn word(rows: &BitRows, wd: usize) -> (usize, u32, usize) {
        if 4 * wd + 4 <= rows.len {
            (rows.first + 4 * wd, 0, 32)
        } else {
            let over = 4 * wd + 4 - rows.len;
            (rows.first + rows.len - 4, 8 * over as u32, 32 - 8 * over)
        }
    }

    /// The 16 subset sums of `w[0..4]`, entry `i` summing the `w[b]` whose bit `b` is set in
    /// `i`: a product and three FMAs against the entries' constant 0/1 bit columns (masked
    /// adds compile to shuffles and blends, twice the work).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn table512(w: &[f32; 4]) -> __m512 {
        let column = |b: u16| {
            let set = [0xAAAA, 0xCCCC, 0xF0F0, 0xFF00][b as usize];
            _mm512_maskz_mov_ps(set, _mm512_set1_ps(1.0))
        };
        let t = _mm512_mul_ps(column(0), _mm512_set1_ps(w[0]));
        let t = _mm512_fmadd_ps(column(1), _mm512_set1_ps(w[1]), t);
        let t = _mm512_fmadd_ps(column(2), _mm512_set1_ps(w[2]), t);
        _mm512_fmadd_ps(column(3), _mm512_set1_ps(w[3]), t)
    }

    /// [`bit_scores`](super::bit_scores) of up to [`HEADS`] heads (`base.len()`), 16 tokens
    /// per vector.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn scores512(
        rows: &BitRows,
        n: usize,
        w: &[f32],
        base: &[f32],
        add: bool,
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller's contract, passed on.
        unsafe { by_heads!(base.len(), scores512_h(rows, n, w, base, add, out, stride)) }
    }

    /// [`scores512`] for `H` heads: accumulators in registers.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scores512_h<const H: usize>(
        rows: &BitRows,
        n: usize,
        w: &[f32],
        base: &[f32],
        add: bool,
        out: &mut [f32],
        stride: usize,
    ) {
        let (codes_per_head, words) = (8 * rows.len, rows.len.div_ceil(4));
        // Tables: [nibble][head] of 16 floats.
        let mut tab = [MaybeUninit::<__m512>::uninit(); HEADS * MAX_D / 4];
        let nibbles = codes_per_head / 4;
        for (h, wh) in w[..H * codes_per_head]
            .chunks_exact(codes_per_head)
            .enumerate()
        {
            for (slot, w4) in tab[..H * nibbles].chunks_exact_mut(H).zip(wh.as_chunks().0) {
                slot[h].write(table512(w4));
            }
        }
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let offsets = _mm512_mullo_epi32(lane, _mm512_set1_epi32(rows.stride as i32));
        for t0 in (0..n).step_by(16) {
            let m = (n - t0).min(16);
            let mask: __mmask16 = if m == 16 { 0xFFFF } else { (1u16 << m) - 1 };
            let at = rows.bytes[t0 * rows.stride..].as_ptr();
            // Every word of the 16 tokens first: the gathers' latencies overlap.
            let mut codes = [_mm512_setzero_si512(); MAX_D / 32];
            for (wd, code) in codes[..words].iter_mut().enumerate() {
                let (at_word, shift, _) = word(rows, wd);
                let idx = _mm512_add_epi32(offsets, _mm512_set1_epi32(at_word as i32));
                // SAFETY: lanes in `mask` read 4 bytes of token `t0 + lane`'s run, inside `bytes`.
                let c = unsafe {
                    _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, idx, at.cast())
                };
                *code = _mm512_srl_epi32(c, _mm_cvtsi32_si128(shift as i32));
            }
            let mut acc = [_mm512_setzero_ps(); H];
            let mut nib = codes[0];
            let tabs = tab[..H * (codes_per_head / 4)].chunks_exact(H);
            for (k, tabs) in tabs.enumerate() {
                // vpermps reads the low 4 bits of each lane: each nibble is one shift from
                // the last (an immediate shift; a shift by a count costs a move to the
                // permutes' port).
                if k % 8 == 0 {
                    nib = codes[k / 8];
                } else {
                    nib = _mm512_srli_epi32::<4>(nib);
                }
                for (a, t) in acc.iter_mut().zip(tabs) {
                    // SAFETY: the tables of every nibble and head were written above.
                    let t = unsafe { t.assume_init() };
                    *a = _mm512_add_ps(*a, _mm512_permutexvar_ps(nib, t));
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let o = out[h * stride + t0..h * stride + t0 + m].as_mut_ptr();
                // SAFETY: the masked load and store touch the `m` floats of `o`.
                unsafe {
                    let mut s = _mm512_add_ps(*a, _mm512_set1_ps(base[h]));
                    if add {
                        s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, o));
                    }
                    _mm512_mask_storeu_ps(o, mask, s);
                }
            }
        }
    }

    /// `out[h·d + c] += lo_c·psum_h + span_c·Σ_t p[h·stride + t]·bit_tc`, 64 channels (four
    /// mask registers) at a time, then 16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn sums512(
        bits: &[u8],
        n: usize,
        d: usize,
        p: &[f32],
        stride: usize,
        s: &Sums,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract, passed on.
        unsafe { by_heads!(out.len() / d, sums512_h(bits, n, d, p, stride, s, out)) }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn sums512_h<const H: usize>(
        bits: &[u8],
        n: usize,
        d: usize,
        p: &[f32],
        stride: usize,
        s: &Sums,
        out: &mut [f32],
    ) {
        let mut c0 = 0;
        while c0 < d {
            // SAFETY: the caller's contract, passed on.
            unsafe {
                if d - c0 >= 64 {
                    slab512::<H, 4>(bits, n, d, c0, p, stride, s, out);
                    c0 += 64;
                } else {
                    slab512::<H, 1>(bits, n, d, c0, p, stride, s, out);
                    c0 += 16;
                }
            }
        }
    }

    /// Channels `c0..c0 + 16·V` of [`sums512`] for `H` heads: `H·V` accumulators.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn slab512<const H: usize, const V: usize>(
        bits: &[u8],
        n: usize,
        d: usize,
        c0: usize,
        p: &[f32],
        stride: usize,
        s: &Sums,
        out: &mut [f32],
    ) {
        let row = d / 8;
        // Half the masked adds are FMAs `p·1 + a` (the same sum, exactly): adds issue only to
        // the FP add pipes, FMAs to the multiply pipes (two of each on Zen 4), so the mix
        // runs 14% faster. Opaque, or the compiler turns `p·1 + a` back into an add.
        let one = _mm512_set1_ps(std::hint::black_box(1.0));
        let mut a = [[_mm512_setzero_ps(); V]; H];
        for t in 0..n {
            let code = &bits[t * row + c0 / 8..][..2 * V];
            let mut k = [0u16; V];
            for (i, ki) in k.iter_mut().enumerate() {
                *ki = u16::from_le_bytes([code[2 * i], code[2 * i + 1]]);
            }
            for (h, ah) in a.iter_mut().enumerate() {
                // SAFETY: the caller checked `h·stride + t < p.len()`.
                let pv = _mm512_set1_ps(unsafe { *p.get_unchecked(h * stride + t) });
                for i in 0..V {
                    ah[i] = if (h * V + i) % 2 == 1 {
                        _mm512_mask3_fmadd_ps(pv, one, ah[i], k[i])
                    } else {
                        _mm512_mask_add_ps(ah[i], k[i], ah[i], pv)
                    };
                }
            }
        }
        for (h, ah) in a.iter().enumerate() {
            let psum = _mm512_set1_ps(s.psum[h]);
            for (i, ai) in ah.iter().enumerate() {
                let c = c0 + 16 * i;
                let o = &mut out[h * d + c..][..16];
                let (lo, span) = (&s.lo[c..c + 16], &s.span[c..c + 16]);
                // SAFETY: `o`, `lo` and `span` hold 16 floats; unaligned loads and store.
                unsafe {
                    let v = _mm512_mul_ps(_mm512_loadu_ps(lo.as_ptr()), psum);
                    let v = _mm512_fmadd_ps(_mm512_loadu_ps(span.as_ptr()), *ai, v);
                    let v = _mm512_add_ps(_mm512_loadu_ps(o.as_ptr()), v);
                    _mm512_storeu_ps(o.as_mut_ptr(), v);
                }
            }
        }
    }

    /// The 8 subset sums of `w[0..3]`, entry `i` summing the `w[b]` whose bit `b` is set in
    /// `i`. On AVX2 a permute indexes eight entries: tables of three codes take one permute
    /// per lookup, where nibble tables took two and a blend (and the permute port bounds both).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn table256(w: [f32; 3]) -> __m256 {
        let column = |b: i32| {
            let one = |i: i32| ((i >> b) & 1) as f32;
            _mm256_setr_ps(
                one(0),
                one(1),
                one(2),
                one(3),
                one(4),
                one(5),
                one(6),
                one(7),
            )
        };
        let t = _mm256_mul_ps(column(0), _mm256_set1_ps(w[0]));
        let t = _mm256_fmadd_ps(column(1), _mm256_set1_ps(w[1]), t);
        _mm256_fmadd_ps(column(2), _mm256_set1_ps(w[2]), t)
    }

    /// [`scores512`] on AVX2, 8 tokens per vector, three codes per table.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores256(
        rows: &BitRows,
        n: usize,
        w: &[f32],
        base: &[f32],
        add: bool,
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller's contract, passed on.
        unsafe { by_heads!(base.len(), scores256_h(rows, n, w, base, add, out, stride)) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores256_h<const H: usize>(
        rows: &BitRows,
        n: usize,
        w: &[f32],
        base: &[f32],
        add: bool,
        out: &mut [f32],
        stride: usize,
    ) {
        let (codes_per_head, words) = (8 * rows.len, rows.len.div_ceil(4));
        // Tables: [group][head], a word's codes in groups of three from its bit 0.
        let mut tab = [MaybeUninit::<__m256>::uninit(); HEADS * (MAX_D / 32) * 11];
        let mut k = 0;
        for wd in 0..words {
            let (_, _, codes) = word(rows, wd);
            for g in (0..codes).step_by(3) {
                for (h, slot) in tab[k * H..(k + 1) * H].iter_mut().enumerate() {
                    let wh = &w[h * codes_per_head + 32 * wd..][..codes];
                    let w3 = [0, 1, 2].map(|b| wh.get(g + b).copied().unwrap_or(0.0));
                    slot.write(table256(w3));
                }
                k += 1;
            }
        }
        let offsets = _mm256_mullo_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(rows.stride as i32),
        );
        for t0 in (0..n).step_by(8) {
            let m = (n - t0).min(8);
            let mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(m as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let at = rows.bytes[t0 * rows.stride..].as_ptr();
            // Every word of the 8 tokens first: the gathers' latencies overlap.
            let mut codes = [_mm256_setzero_si256(); MAX_D / 32];
            for (wd, code) in codes[..words].iter_mut().enumerate() {
                let (at_word, shift, _) = word(rows, wd);
                let idx = _mm256_add_epi32(offsets, _mm256_set1_epi32(at_word as i32));
                // SAFETY: lanes in `mask` read 4 bytes of token `t0 + lane`'s run, inside `bytes`.
                let c = unsafe {
                    _mm256_mask_i32gather_epi32::<1>(_mm256_setzero_si256(), at.cast(), idx, mask)
                };
                *code = _mm256_srl_epi32(c, _mm_cvtsi32_si128(shift as i32));
            }
            let mut acc = [_mm256_setzero_ps(); H];
            let mut k = 0;
            for (wd, &code) in codes[..words].iter().enumerate() {
                let groups = word(rows, wd).2.div_ceil(3);
                let tabs = &tab[k * H..(k + groups) * H];
                // SAFETY: the tables of every group and head were written above; AVX2 and
                // FMA are this function's. A whole word's eleven groups are unrolled.
                unsafe {
                    if groups == 11 {
                        lookups::<H>(code, 11, tabs, &mut acc);
                    } else {
                        lookups::<H>(code, groups, tabs, &mut acc);
                    }
                }
                k += groups;
            }
            for (h, a) in acc.iter().enumerate() {
                let o = &mut out[h * stride + t0..h * stride + t0 + m];
                let mut s = [0f32; 8];
                // SAFETY: `s` holds 8 floats.
                unsafe {
                    _mm256_storeu_ps(s.as_mut_ptr(), _mm256_add_ps(*a, _mm256_set1_ps(base[h])))
                };
                for (o, &x) in o.iter_mut().zip(&s) {
                    *o = if add { *o + x } else { x };
                }
            }
        }
    }

    /// `acc[h] += table(group g, head h)[code >> 3g]` for the word's `groups` groups, `tabs`
    /// holding their tables [group][head]. vpermps reads the low three bits of each lane: a
    /// group is one immediate shift from the last.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; every table of `tabs` was written.
    #[inline(always)]
    unsafe fn lookups<const H: usize>(
        mut code: __m256i,
        groups: usize,
        tabs: &[MaybeUninit<__m256>],
        acc: &mut [__m256; H],
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            // The sums are FMAs `x·1 + a` (the same sum, exactly): adds may issue to the
            // permutes' port, FMAs never. Opaque, or the compiler turns them back into adds.
            let one = _mm256_set1_ps(std::hint::black_box(1.0));
            for (g, tabs) in tabs.chunks_exact(H).take(groups).enumerate() {
                if g > 0 {
                    code = _mm256_srli_epi32::<3>(code);
                }
                for (a, t) in acc.iter_mut().zip(tabs) {
                    *a = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(t.assume_init(), code), one, *a);
                }
            }
        }
    }

    /// The bits of every byte as eight floats, 0.0 or 1.0: a load expands a byte of codes,
    /// where a broadcast, an `and`, a compare and a mask cost four ALU operations.
    #[repr(align(32))]
    struct ByteBits([[f32; 8]; 256]);

    static BYTE_BITS: ByteBits = {
        let mut t = [[0f32; 8]; 256];
        let mut b = 0;
        while b < 256 {
            let mut i = 0;
            while i < 8 {
                t[b][i] = ((b >> i) & 1) as f32;
                i += 1;
            }
            b += 1;
        }
        ByteBits(t)
    };

    /// [`sums512`], 16 channels (two bytes, each expanded to eight 0/1 floats) at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sums256(
        bits: &[u8],
        n: usize,
        d: usize,
        p: &[f32],
        stride: usize,
        s: &Sums,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract, passed on.
        unsafe { by_heads!(out.len() / d, sums256_h(bits, n, d, p, stride, s, out)) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn sums256_h<const H: usize>(
        bits: &[u8],
        n: usize,
        d: usize,
        p: &[f32],
        stride: usize,
        s: &Sums,
        out: &mut [f32],
    ) {
        let row = d / 8;
        for c0 in (0..d).step_by(16) {
            let mut a = [[_mm256_setzero_ps(); 2]; H];
            for t in 0..n {
                let (b0, b1) = (bits[t * row + c0 / 8], bits[t * row + c0 / 8 + 1]);
                // Each bit as 0.0 or 1.0: one FMA per head adds the weight where it is set
                // (exactly: p·1 + a = p + a, p·0 + a = a).
                let expand = |b: u8| {
                    // SAFETY: an entry is eight floats, 32-byte aligned.
                    unsafe { _mm256_load_ps(BYTE_BITS.0[b as usize].as_ptr()) }
                };
                let (m0, m1) = (expand(b0), expand(b1));
                for (h, ah) in a.iter_mut().enumerate() {
                    // SAFETY: the caller checked `h·stride + t < p.len()`.
                    let pv = _mm256_set1_ps(unsafe { *p.get_unchecked(h * stride + t) });
                    ah[0] = _mm256_fmadd_ps(pv, m0, ah[0]);
                    ah[1] = _mm256_fmadd_ps(pv, m1, ah[1]);
                }
            }
            for (h, ah) in a.iter().enumerate() {
                let psum = _mm256_set1_ps(s.psum[h]);
                for (i, ai) in ah.iter().enumerate() {
                    let c = c0 + 8 * i;
                    let o = &mut out[h * d + c..][..8];
                    let (lo, span) = (&s.lo[c..c + 8], &s.span[c..c + 8]);
                    // SAFETY: `o`, `lo` and `span` hold 8 floats; unaligned loads and store.
                    unsafe {
                        let v = _mm256_mul_ps(_mm256_loadu_ps(lo.as_ptr()), psum);
                        let v = _mm256_fmadd_ps(_mm256_loadu_ps(span.as_ptr()), *ai, v);
                        let v = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), v);
                        _mm256_storeu_ps(o.as_mut_ptr(), v);
                    }
                }
            }
        }
    }
}
