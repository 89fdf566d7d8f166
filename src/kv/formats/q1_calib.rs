//! `q1_calib`: CalibQuant's 1-bit quantization. Per channel over the whole block, the range
//! is shrunk to `lo = α·min_t x`, `hi = α·max_t x` (α = `calib_alpha_k` for keys,
//! `calib_alpha_v` for values); a bit says whether `x > (lo + hi) / 2` and the value is
//! `lo + bit·(hi − lo)`, with the f16-rounded `lo`, `hi` that are stored.
//!
//! Layout: `lo[d]` then `hi[d]` as f16, then the bits token-major, `d / 8` bytes per token:
//! bit of token `t`, channel `c` at byte `t·d/8 + c/8`, bit `c % 8` (LSB first).
//!
//! Scores and sums are post-scaled from the bits, never dequantized:
//! `q·x̂_t = Σ_c q_c·lo_c + Σ_c (q_c·(hi_c − lo_c))·bit_tc`.

use super::pack::{get_f16, pack_bits, put_f16, round_f16, unpack_bits};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Role, Shape, check_input};

pub struct Q1Calib;

/// The stored range of every channel, and the bits that follow it.
struct Stored<'a> {
    lo: Vec<f32>,
    hi: Vec<f32>,
    bits: &'a [u8],
}

fn read(block: &[u8], d: usize) -> Stored<'_> {
    Stored {
        lo: (0..d).map(|c| get_f16(block, c)).collect(),
        hi: (0..d).map(|c| get_f16(block, d + c)).collect(),
        bits: &block[4 * d..],
    }
}

impl Format for Q1Calib {
    fn block_size(&self, shape: Shape, _n_protected: usize, _params: &QuantParams) -> BlockSize {
        BlockSize {
            codes: shape.n * shape.d / 8,
            meta: 4 * shape.d,
        }
    }

    // Inlined into `kv::simd`'s copy compiled for AVX2 (same source, same bytes).
    #[inline(always)]
    fn quantize(
        &self,
        x: &[f32],
        shape: Shape,
        protect: &[bool],
        params: &QuantParams,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        check_input(x, shape, protect)?;
        let alpha = match shape.role {
            Role::Key => params.calib_alpha_k,
            Role::Value => params.calib_alpha_v,
        };
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "q1_calib: range shrink α = {alpha} for {:?}s must be in (0, 1]",
                shape.role
            )));
        }
        let d = shape.d;
        let (mut lo, mut hi) = (vec![f32::INFINITY; d], vec![f32::NEG_INFINITY; d]);
        for row in x.chunks_exact(d) {
            for (c, &v) in row.iter().enumerate() {
                lo[c] = lo[c].min(v);
                hi[c] = hi[c].max(v);
            }
        }
        for c in 0..d {
            lo[c] = round_f16(alpha * lo[c]);
            hi[c] = round_f16(alpha * hi[c]);
        }
        out.reserve(self.block_size(shape, 0, params).total());
        lo.iter().for_each(|&v| put_f16(out, v));
        hi.iter().for_each(|&v| put_f16(out, v));
        let mid: Vec<f32> = lo.iter().zip(&hi).map(|(&l, &h)| (l + h) / 2.0).collect();
        let mut bits = Vec::with_capacity(d);
        for row in x.chunks_exact(d) {
            bits.clear();
            bits.extend(row.iter().zip(&mid).map(|(&v, &m)| u8::from(v > m)));
            pack_bits(&bits, 1, out);
        }
        Ok(())
    }

    fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]) {
        let d = shape.d;
        let s = read(block, d);
        for (row, o) in s
            .bits
            .chunks_exact(d / 8)
            .zip(out.chunks_exact_mut(d))
            .take(shape.n)
        {
            for (c, v) in o.iter_mut().enumerate() {
                *v = s.lo[c] + unpack_bits(row, 1, c) as f32 * (s.hi[c] - s.lo[c]);
            }
        }
    }

    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
        let d = shape.d;
        let s = read(block, d);
        let base: f32 = q[..d].iter().zip(&s.lo).map(|(&qc, &l)| qc * l).sum();
        let w: Vec<f32> = (0..d).map(|c| q[c] * (s.hi[c] - s.lo[c])).collect();
        for (row, o) in s.bits.chunks_exact(d / 8).zip(&mut out[..shape.n]) {
            let dot: f32 = w
                .iter()
                .enumerate()
                .filter(|&(c, _)| unpack_bits(row, 1, c) == 1)
                .map(|(_, &wc)| wc)
                .sum();
            *o = base + dot;
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
        let d = shape.d;
        let s = read(block, d);
        let p = &p[..shape.n];
        // acc_c = Σ_t p_t·bit_tc, then out_c += lo_c·Σ_t p_t + (hi_c − lo_c)·acc_c.
        let mut acc = vec![0f32; d];
        for (row, &pt) in s.bits.chunks_exact(d / 8).zip(p) {
            for (c, a) in acc.iter_mut().enumerate() {
                if unpack_bits(row, 1, c) == 1 {
                    *a += pt;
                }
            }
        }
        let psum: f32 = p.iter().sum();
        for (c, (o, &a)) in out[..d].iter_mut().zip(&acc).enumerate() {
            *o += s.lo[c] * psum + (s.hi[c] - s.lo[c]) * a;
        }
    }
}
