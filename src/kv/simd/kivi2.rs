//! Fast `kivi2` (see `formats/kivi2.rs`). Keys: per group of 32 tokens, each head's query is
//! folded with the channels' steps and offsets once; each token's 2-bit codes are decoded
//! once into a row for every head. Values: a token's groups decode to their values in a row
//! (`rows::RowKernel`). Sums of keys (never asked) run the reference.

use super::q2_had::unpack;
use super::rows::{DecodeRow, RowKernel, store_dots};
use super::{Kernel, PerHead};
use crate::kv::formats::kivi2::{
    GROUP, VALUE_GROUP_BYTES, stored_key_groups, value_group, value_row_bytes,
};
use crate::kv::{FormatId, Role, Shape};

/// AVX2 and FMA.
pub struct Kivi2Avx2;

struct ValueRows;

impl DecodeRow for ValueRows {
    #[inline(always)]
    fn row(&self, block: &[u8], d: usize, t: usize, out: &mut [f32]) {
        let row = &block[t * value_row_bytes(d)..(t + 1) * value_row_bytes(d)];
        for (group, o) in row.chunks(VALUE_GROUP_BYTES).zip(out.chunks_mut(GROUP)) {
            let (mm, packed) = value_group(group);
            unpack::<2>(packed, o);
            o.iter_mut().for_each(|v| *v = *v * mm.step + mm.lo);
        }
    }
}

const VALUES: RowKernel<ValueRows> = RowKernel(ValueRows);

impl Kernel for Kivi2Avx2 {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        match shape.role {
            // SAFETY: `kernel` hands out this path only where `Isa::Avx2` is supported.
            Role::Key => unsafe { key_scores(block, shape, q, out, stride) },
            Role::Value => VALUES.scores(block, shape, q, out, stride),
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        match shape.role {
            Role::Key => PerHead(FormatId::Kivi2).accumulate(block, shape, p, stride, out),
            Role::Value => VALUES.accumulate(block, shape, p, stride, out),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn key_scores(block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
    let d = shape.d;
    let nh = q.len() / d;
    let (mut w, mut base) = (vec![0f32; nh * d], vec![0f32; nh]);
    let mut row = [0f32; 256];
    let row = &mut row[..d];
    for g in stored_key_groups(block, shape) {
        for (h, qh) in q.chunks_exact(d).enumerate() {
            base[h] = qh.iter().zip(&g.mm).map(|(&qc, mm)| qc * mm.lo).sum();
            for ((wc, &qc), mm) in w[h * d..(h + 1) * d].iter_mut().zip(qh).zip(&g.mm) {
                *wc = qc * mm.step;
            }
        }
        for (i, codes) in g.rows.chunks_exact(d / 4).enumerate() {
            unpack::<2>(codes, row);
            // SAFETY: AVX2 and FMA are enabled here.
            unsafe { store_dots(&w, &base, row, out, stride, g.t0 + i) };
        }
    }
}
