//! Fast `q4_0` (see `formats/q4_0.rs`): each token's nibbles, less 8, times their group scale,
//! decoded once into a row for every head (`rows::RowKernel`).

use super::rows::{DecodeRow, RowKernel};
use crate::kv::formats::pack::get_f16;
use crate::kv::formats::q4_0::{GROUP_BYTES, QK, row_bytes};

pub struct Q4_0Rows;

/// AVX2 and FMA.
pub static Q4_0_AVX2: RowKernel<Q4_0Rows> = RowKernel(Q4_0Rows);

impl DecodeRow for Q4_0Rows {
    #[inline(always)]
    fn row(&self, block: &[u8], d: usize, t: usize, out: &mut [f32]) {
        let row = &block[t * row_bytes(d)..(t + 1) * row_bytes(d)];
        for (group, o) in row.chunks(GROUP_BYTES).zip(out.chunks_mut(QK)) {
            let s = get_f16(group, 0);
            let nib = &group[2..];
            let (lo, hi) = o.split_at_mut(nib.len());
            for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(nib) {
                *l = ((b & 0x0F) as i32 - 8) as f32 * s;
                *h = ((b >> 4) as i32 - 8) as f32 * s;
            }
        }
    }
}
