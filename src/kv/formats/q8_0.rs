//! `q8_0`: llama.cpp's q8_0, byte for byte as ggml's `quantize_row_q8_0_ref`, applied to each
//! token's row of one KV head.
//!
//! Layout: `n` token rows back to back. A row is the token's `d` channels cut into groups of
//! 32 (for d = 80 and 112 the last group has 16), each group an f16 scale `s` (little-endian)
//! then one int8 code per channel. Value = `code · s`.

use super::pack::{get_f16, put_f16};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Shape, check_input};

pub struct Q8_0;

/// ggml's QK8_0: values per group.
pub(crate) const QK: usize = 32;
/// Bytes of a full group: f16 scale and 32 codes.
pub(crate) const GROUP_BYTES: usize = 2 + QK;

pub(crate) fn row_bytes(d: usize) -> usize {
    2 * d.div_ceil(QK) + d
}

impl Format for Q8_0 {
    fn block_size(&self, shape: Shape, _n_protected: usize, _params: &QuantParams) -> BlockSize {
        BlockSize {
            codes: shape.n * shape.d,
            meta: shape.n * 2 * shape.d.div_ceil(QK),
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
        out.reserve(self.block_size(shape, 0, params).total());
        for row in x.chunks_exact(shape.d) {
            for group in row.chunks(QK) {
                let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = amax / 127.0;
                // ggml takes the inverse of the f32 scale, then stores the scale as f16.
                let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
                put_f16(out, s);
                // f32::round is roundf: half away from zero.
                out.extend(group.iter().map(|&v| (v * inv).round() as i8 as u8));
            }
        }
        Ok(())
    }

    fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]) {
        let d = shape.d;
        for (row, o) in block
            .chunks_exact(row_bytes(d))
            .zip(out.chunks_exact_mut(d))
            .take(shape.n)
        {
            for (group, og) in row.chunks(GROUP_BYTES).zip(o.chunks_mut(QK)) {
                let s = get_f16(group, 0);
                for (&c, v) in group[2..].iter().zip(og) {
                    *v = c as i8 as f32 * s;
                }
            }
        }
    }

    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
        let d = shape.d;
        for (row, o) in block.chunks_exact(row_bytes(d)).zip(&mut out[..shape.n]) {
            *o = row
                .chunks(GROUP_BYTES)
                .zip(q[..d].chunks(QK))
                .map(|(group, qg)| {
                    let dot: f32 = group[2..]
                        .iter()
                        .zip(qg)
                        .map(|(&c, &qv)| qv * c as i8 as f32)
                        .sum();
                    get_f16(group, 0) * dot
                })
                .sum();
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
        let d = shape.d;
        for (row, &pt) in block.chunks_exact(row_bytes(d)).zip(&p[..shape.n]) {
            for (group, og) in row.chunks(GROUP_BYTES).zip(out[..d].chunks_mut(QK)) {
                let ps = pt * get_f16(group, 0);
                for (&c, o) in group[2..].iter().zip(og) {
                    *o += ps * c as i8 as f32;
                }
            }
        }
    }
}
