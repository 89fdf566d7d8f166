//! `q4_0`: llama.cpp's q4_0, byte for byte as ggml's `quantize_row_q4_0_ref`, applied to each
//! token's row of one KV head.
//!
//! Layout: `n` token rows back to back. A row is the token's `d` channels cut into groups of
//! 32 (for d = 80 and 112 the last group has 16), each group an f16 scale `s` (little-endian)
//! then `len / 2` bytes: byte `j` holds channel `j` of the group in its low nibble and
//! channel `j + len / 2` in its high nibble. Value = `(code − 8) · s`.

use super::pack::{get_f16, put_f16};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Shape, check_input};

pub struct Q4_0;

/// ggml's QK4_0: values per group.
pub(crate) const QK: usize = 32;
/// Bytes of a full group: f16 scale and 16 bytes of nibbles.
pub(crate) const GROUP_BYTES: usize = 2 + QK / 2;

pub(crate) fn row_bytes(d: usize) -> usize {
    2 * d.div_ceil(QK) + d / 2
}

/// The signed codes `code − 8` of one stored group, in channel order.
fn codes(group: &[u8]) -> impl Iterator<Item = f32> + '_ {
    let nib = &group[2..];
    let lo = nib.iter().map(|&b| (b & 0x0F) as i32 - 8);
    let hi = nib.iter().map(|&b| (b >> 4) as i32 - 8);
    lo.chain(hi).map(|c| c as f32)
}

impl Format for Q4_0 {
    fn block_size(&self, shape: Shape, _n_protected: usize, _params: &QuantParams) -> BlockSize {
        BlockSize {
            codes: shape.n * shape.d / 2,
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
                // The value of largest magnitude, sign kept; the first one on ties.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in group {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let s = max / -8.0;
                // ggml takes the inverse of the f32 scale, then stores the scale as f16.
                let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
                put_f16(out, s);
                // `as i8` truncates toward zero like C's (int8_t) cast; the sum is in [0, 16.5].
                let code = |v: f32| ((v * inv + 8.5) as i8).min(15) as u8;
                let (a, b) = group.split_at(group.len() / 2);
                out.extend(a.iter().zip(b).map(|(&u, &v)| code(u) | code(v) << 4));
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
                for (c, v) in codes(group).zip(og) {
                    *v = c * s;
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
                    let dot: f32 = codes(group).zip(qg).map(|(c, &qv)| qv * c).sum();
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
                for (c, o) in codes(group).zip(og) {
                    *o += ps * c;
                }
            }
        }
    }
}
