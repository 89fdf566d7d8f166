//! `kivi2`: KIVI's 2-bit asymmetric min-max quantization. Keys are quantized per channel over
//! groups of 32 tokens (key outliers sit in fixed channels), values per token over groups of
//! 32 channels. `s = (max − min) / 3`, `code = round(clamp((x − min) / s, 0, 3))`,
//! value = `code · s + min`, with min and s stored as f16 ([`MinMax`]).
//!
//! Layout, keys: per group of 32 tokens (the last may have 1..=32), `min[d]` then `s[d]` as
//! f16, then the group's tokens, `d / 4` bytes each (2-bit codes, channel `c` at byte `c / 4`,
//! bits `2 (c % 4)`). Values: `n` token rows; a row is, per group of 32 channels (for d = 80
//! and 112 the last has 16), `min` and `s` as f16 then `len / 4` bytes of codes.

use super::minmax::MinMax;
use super::pack::{get_f16, pack_bits, put_f16, unpack_bits};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Role, Shape, check_input};

pub struct Kivi2;

/// Tokens per key group and channels per value group.
pub(crate) const GROUP: usize = 32;
const LEVELS: u32 = 3;
const BITS: usize = 2;

/// Bytes of a key group of `m` tokens.
pub(crate) fn key_group_bytes(d: usize, m: usize) -> usize {
    4 * d + m * d / 4
}

/// Bytes of a full value channel group: min, step and 32 codes.
pub(crate) const VALUE_GROUP_BYTES: usize = 4 + GROUP / 4;

pub(crate) fn value_row_bytes(d: usize) -> usize {
    4 * d.div_ceil(GROUP) + d / 4
}

/// One stored key group: its first token, each channel's parameters, its packed token rows.
pub(crate) struct KeyGroup<'a> {
    pub(crate) t0: usize,
    pub(crate) mm: Vec<MinMax>,
    pub(crate) rows: &'a [u8],
}

impl KeyGroup<'_> {
    fn tokens(&self) -> std::ops::Range<usize> {
        self.t0..self.t0 + self.rows.len() * 4 / self.mm.len()
    }
}

/// The key groups of a stored block, in token order.
pub(crate) fn stored_key_groups(block: &[u8], shape: Shape) -> impl Iterator<Item = KeyGroup<'_>> {
    let d = shape.d;
    let mut at = 0;
    key_groups(shape.n).map(move |(t0, m)| {
        let group = &block[at..at + key_group_bytes(d, m)];
        at += group.len();
        let mm = (0..d)
            .map(|c| MinMax {
                lo: get_f16(group, c),
                step: get_f16(group, d + c),
            })
            .collect();
        KeyGroup {
            t0,
            mm,
            rows: &group[4 * d..],
        }
    })
}

/// The stored parameters and packed codes of one value channel group.
pub(crate) fn value_group(group: &[u8]) -> (MinMax, &[u8]) {
    let mm = MinMax {
        lo: get_f16(group, 0),
        step: get_f16(group, 1),
    };
    (mm, &group[4..])
}

/// Key groups of the block: `(first token, tokens)`.
fn key_groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(GROUP).map(move |t0| (t0, GROUP.min(n - t0)))
}

#[inline(always)]
fn quantize_keys(x: &[f32], shape: Shape, out: &mut Vec<u8>) {
    let d = shape.d;
    let mut mm = [MinMax { lo: 0.0, step: 0.0 }; 256];
    let mm = &mut mm[..d];
    let mut codes = Vec::with_capacity(d);
    for (t0, m) in key_groups(shape.n) {
        let rows = &x[t0 * d..(t0 + m) * d];
        // Each channel's range, a row at a time (in token order, as a fold per channel).
        let (mut lo, mut hi) = ([f32::INFINITY; 256], [f32::NEG_INFINITY; 256]);
        for row in rows.chunks_exact(d) {
            for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                (*l, *h) = (l.min(v), h.max(v));
            }
        }
        for (c, p) in mm.iter_mut().enumerate() {
            *p = MinMax::new(lo[c], hi[c], LEVELS);
        }
        mm.iter().for_each(|p| put_f16(out, p.lo));
        mm.iter().for_each(|p| put_f16(out, p.step));
        for row in rows.chunks_exact(d) {
            codes.clear();
            codes.extend(row.iter().zip(&*mm).map(|(&v, p)| p.code(v, LEVELS)));
            pack_bits(&codes, BITS, out);
        }
    }
}

#[inline(always)]
fn quantize_values(x: &[f32], shape: Shape, out: &mut Vec<u8>) {
    let mut codes = Vec::with_capacity(GROUP);
    for row in x.chunks_exact(shape.d) {
        for group in row.chunks(GROUP) {
            let mm = MinMax::over(group.iter().copied(), LEVELS);
            put_f16(out, mm.lo);
            put_f16(out, mm.step);
            codes.clear();
            codes.extend(group.iter().map(|&v| mm.code(v, LEVELS)));
            pack_bits(&codes, BITS, out);
        }
    }
}

impl Format for Kivi2 {
    fn block_size(&self, shape: Shape, _n_protected: usize, _params: &QuantParams) -> BlockSize {
        let Shape { n, d, role } = shape;
        let meta = match role {
            Role::Key => n.div_ceil(GROUP) * 4 * d,
            Role::Value => n * 4 * d.div_ceil(GROUP),
        };
        BlockSize {
            codes: n * d / 4,
            meta,
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
        match shape.role {
            Role::Key => quantize_keys(x, shape, out),
            Role::Value => quantize_values(x, shape, out),
        }
        Ok(())
    }

    fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]) {
        let d = shape.d;
        match shape.role {
            Role::Key => {
                for g in stored_key_groups(block, shape) {
                    let rows = g.rows.chunks_exact(d / 4);
                    for (row, o) in rows.zip(out[g.t0 * d..].chunks_exact_mut(d)) {
                        for (c, (v, mm)) in o.iter_mut().zip(&g.mm).enumerate() {
                            *v = mm.value(unpack_bits(row, BITS, c));
                        }
                    }
                }
            }
            Role::Value => {
                for (row, o) in block
                    .chunks_exact(value_row_bytes(d))
                    .zip(out.chunks_exact_mut(d))
                    .take(shape.n)
                {
                    for (group, og) in row.chunks(VALUE_GROUP_BYTES).zip(o.chunks_mut(GROUP)) {
                        let (mm, packed) = value_group(group);
                        for (c, v) in og.iter_mut().enumerate() {
                            *v = mm.value(unpack_bits(packed, BITS, c));
                        }
                    }
                }
            }
        }
    }

    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
        let d = shape.d;
        match shape.role {
            Role::Key => {
                // q·x̂_t = Σ_c q_c·min_c + Σ_c (q_c·s_c)·code_tc: fold the step into the query
                // once per group.
                for g in stored_key_groups(block, shape) {
                    let base: f32 = q[..d].iter().zip(&g.mm).map(|(&qc, mm)| qc * mm.lo).sum();
                    let w: Vec<f32> = q[..d]
                        .iter()
                        .zip(&g.mm)
                        .map(|(&qc, mm)| qc * mm.step)
                        .collect();
                    for (row, o) in g.rows.chunks_exact(d / 4).zip(&mut out[g.tokens()]) {
                        let dot: f32 = w
                            .iter()
                            .enumerate()
                            .map(|(c, &wc)| wc * unpack_bits(row, BITS, c) as f32)
                            .sum();
                        *o = base + dot;
                    }
                }
            }
            Role::Value => {
                // Per channel group: s·Σ q_c·code_c + min·Σ q_c, the query sums taken once.
                let qsum: Vec<f32> = q[..d].chunks(GROUP).map(|g| g.iter().sum()).collect();
                for (row, o) in block
                    .chunks_exact(value_row_bytes(d))
                    .zip(&mut out[..shape.n])
                {
                    *o = row
                        .chunks(VALUE_GROUP_BYTES)
                        .zip(q[..d].chunks(GROUP))
                        .zip(&qsum)
                        .map(|((group, qg), &qs)| {
                            let (mm, packed) = value_group(group);
                            let dot: f32 = qg
                                .iter()
                                .enumerate()
                                .map(|(c, &qc)| qc * unpack_bits(packed, BITS, c) as f32)
                                .sum();
                            mm.step * dot + mm.lo * qs
                        })
                        .sum();
                }
            }
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
        let d = shape.d;
        match shape.role {
            Role::Key => {
                // out_c += min_c·Σ_t p_t + s_c·Σ_t p_t·code_tc, per group.
                let mut acc = vec![0f32; d];
                for g in stored_key_groups(block, shape) {
                    let pg = &p[g.tokens()];
                    acc.fill(0.0);
                    for (row, &pt) in g.rows.chunks_exact(d / 4).zip(pg) {
                        for (c, a) in acc.iter_mut().enumerate() {
                            *a += pt * unpack_bits(row, BITS, c) as f32;
                        }
                    }
                    let psum: f32 = pg.iter().sum();
                    for ((o, &a), mm) in out[..d].iter_mut().zip(&acc).zip(&g.mm) {
                        *o += mm.lo * psum + mm.step * a;
                    }
                }
            }
            Role::Value => {
                for (row, &pt) in block.chunks_exact(value_row_bytes(d)).zip(&p[..shape.n]) {
                    for (group, og) in row
                        .chunks(VALUE_GROUP_BYTES)
                        .zip(out[..d].chunks_mut(GROUP))
                    {
                        let (mm, packed) = value_group(group);
                        let (ps, pm) = (pt * mm.step, pt * mm.lo);
                        for (c, o) in og.iter_mut().enumerate() {
                            *o += ps * unpack_bits(packed, BITS, c) as f32 + pm;
                        }
                    }
                }
            }
        }
    }
}
