//! Fast `q8_0` (see `formats/q8_0.rs`): each token's codes times their group scale, decoded
//! once into a row for every head (`rows::RowKernel`).

use super::rows::{DecodeRow, RowKernel};
use crate::kv::formats::pack::get_f16;
use crate::kv::formats::q8_0::{GROUP_BYTES, QK, row_bytes};

pub struct Q8_0Rows;

/// AVX2 and FMA.
pub static Q8_0_AVX2: RowKernel<Q8_0Rows> = RowKernel(Q8_0Rows);

impl DecodeRow for Q8_0Rows {
    #[inline(always)]
    fn row(&self, block: &[u8], d: usize, t: usize, out: &mut [f32]) {
        let row = &block[t * row_bytes(d)..(t + 1) * row_bytes(d)];
        for (group, o) in row.chunks(GROUP_BYTES).zip(out.chunks_mut(QK)) {
            let s = get_f16(group, 0);
            for (v, &c) in o.iter_mut().zip(&group[2..]) {
                *v = c as i8 as f32 * s;
            }
        }
    }
}
