//! Helpers of kernels that decode one token at a time into a row of floats (a few registers'
//! worth, on the stack) and serve every query head from it: the dot products of scores and
//! the weighted sums of values. Compiled inside the kernels' AVX2 functions.

use std::arch::x86_64::*;

/// `w_h · row` for up to 8 heads (`w` is `[nh][d]`, `d` a multiple of 8): the per-token step
/// of kernels that decode a token's row into registers' worth of floats and serve every head.
///
/// # Safety
/// AVX2 and FMA must be present.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dots8(w: &[f32], row: &[f32]) -> [f32; 8] {
    let d = row.len();
    let nh = w.len() / d;
    debug_assert!(nh <= 8 && d.is_multiple_of(8));
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
    let mut tile = Tile::new(d);
    for t in 0..n {
        r.row(block, d, t, tile.next());
        tile.push(t, p, stride, out);
    }
    tile.flush(p, stride, out);
}

/// Tokens whose rows are summed together: their weighted sum goes to memory once per tile,
/// the accumulators of every head staying in registers meanwhile.
const TILE: usize = 8;

/// Up to [`TILE`] decoded rows waiting to be added, `acc_h += Σ_i p[h·stride + t_i]·row_i`.
pub(crate) struct Tile {
    rows: [f32; TILE * 256],
    t: [usize; TILE],
    m: usize,
    d: usize,
}

impl Tile {
    pub(crate) fn new(d: usize) -> Tile {
        Tile {
            rows: [0.0; TILE * 256],
            t: [0; TILE],
            m: 0,
            d,
        }
    }

    /// The slot of the next row.
    pub(crate) fn next(&mut self) -> &mut [f32] {
        &mut self.rows[self.m * self.d..(self.m + 1) * self.d]
    }

    /// Takes the row written in [`Tile::next`] as token `t`'s; adds the tile when full.
    pub(crate) fn push(&mut self, t: usize, p: &[f32], stride: usize, acc: &mut [f32]) {
        self.t[self.m] = t;
        self.m += 1;
        if self.m == TILE {
            self.flush(p, stride, acc);
        }
    }

    /// Adds the rows waiting.
    pub(crate) fn flush(&mut self, p: &[f32], stride: usize, acc: &mut [f32]) {
        let d = self.d;
        let ts = &self.t[..self.m];
        for (pass, ap) in acc.chunks_mut(7 * d).enumerate() {
            let p = &p[pass * 7 * stride..];
            for h in 0..ap.len() / d {
                assert!(ts.iter().all(|&t| h * stride + t < p.len()));
            }
            // SAFETY: every caller is an AVX2 kernel; `p` holds every weight read (asserted).
            unsafe { by_heads!(ap.len() / d, tile_sums(&self.rows, ts, d, p, stride, ap)) }
        }
        self.m = 0;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_sums<const H: usize>(
    rows: &[f32],
    ts: &[usize],
    d: usize,
    p: &[f32],
    stride: usize,
    acc: &mut [f32],
) {
    let load = |i: usize, c: usize| {
        let r = &rows[i * d + c..i * d + c + 16];
        // SAFETY: `r` holds 16 floats; unaligned loads.
        unsafe {
            (
                _mm256_loadu_ps(r.as_ptr()),
                _mm256_loadu_ps(r.as_ptr().add(8)),
            )
        }
    };
    // SAFETY: the caller checked every weight read.
    unsafe { slab_sums::<H>(d, ts.len(), load, |i| ts[i], p, stride, acc) }
}

/// `out[h·d + c] += Σ_i p[h·stride + tok(i)]·row_i[c]` for `m` rows that `load(i, c)` reads 16
/// channels at a time: sixteen channels of every row, then the next sixteen, with the `H`
/// heads' accumulators in registers.
///
/// # Safety
/// AVX2 and FMA must be present, and `h·stride + tok(i) < p.len()` for every head and row.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn slab_sums<const H: usize>(
    d: usize,
    m: usize,
    load: impl Fn(usize, usize) -> (__m256, __m256),
    tok: impl Fn(usize) -> usize,
    p: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    for c in (0..d).step_by(16) {
        let mut a = [[_mm256_setzero_ps(); 2]; H];
        for i in 0..m {
            let (x0, x1) = load(i, c);
            let t = tok(i);
            for (h, ah) in a.iter_mut().enumerate() {
                // SAFETY: the caller's contract: `h·stride + t < p.len()`.
                let pv = _mm256_set1_ps(unsafe { *p.get_unchecked(h * stride + t) });
                ah[0] = _mm256_fmadd_ps(pv, x0, ah[0]);
                ah[1] = _mm256_fmadd_ps(pv, x1, ah[1]);
            }
        }
        for (h, ah) in a.iter().enumerate() {
            let o = &mut out[h * d + c..h * d + c + 16];
            // SAFETY: `o` holds 16 floats; unaligned loads and stores.
            unsafe {
                let (o0, o1) = (o.as_mut_ptr(), o.as_mut_ptr().add(8));
                _mm256_storeu_ps(o0, _mm256_add_ps(_mm256_loadu_ps(o0), ah[0]));
                _mm256_storeu_ps(o1, _mm256_add_ps(_mm256_loadu_ps(o1), ah[1]));
            }
        }
    }
}
