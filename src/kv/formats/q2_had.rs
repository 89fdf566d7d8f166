//! `q2_had` and `q4_had` (AKVQ-VL): every token is rotated by a normalised Walsh-Hadamard
//! transform, which spreads a few outlier channels over all of them, then quantized per
//! token by asymmetric min-max over groups of 64 rotated values, the range clipped to
//! `had_clip` of its min and max. Pivot tokens (massive activations, chosen by the cache)
//! stay unrotated f16 rows inside the same block. The two formats differ only in the code
//! width (2 or 4 bits), a const generic below.
//!
//! Layout (details in `docs/FORMATS.md`), `n_p` protected and `n_q = n - n_p`
//! quantized tokens, `G = ceil(d / 64)` groups per token:
//! - `u32` little-endian `n_p`;
//! - `n_q` records in token order: `G` pairs of f16 (`lo`, `step`), then `d` codes packed
//!   by [`pack_bits`] (rotated channel order);
//! - `n_p` rows of `d` f16, in token order, unrotated;
//! - only when `n_p > 0`: the mask, `n` bits packed by [`pack_bits`], bit `t` set when
//!   token `t` is protected.

use std::ops::Range;

use super::minmax::{MinMax, range};
use super::pack::{get_f16, pack_bits, packed_len, put_f16, stored_f16, unpack_bits};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Shape, check_input};

/// Rotated values per min-max group.
const GROUP: usize = 64;
/// The protected-token count that opens every block; 4 bytes keep the f16 pairs after it
/// 4-byte aligned for wide loads.
pub(crate) const HEADER: usize = 4;
/// Bytes of one group's (`lo`, `step`) pair.
const PAIR: usize = 4;

/// In-place normalised Walsh-Hadamard transform, `H·x / sqrt(len)` with `H` the Sylvester
/// matrix (`H_1 = [1]`, `H_2k = [[H_k, H_k], [H_k, -H_k]]`). Orthonormal and symmetric, so it
/// is its own inverse. `x.len()` must be a power of two.
// Always inlined, so that the fast quantizer's AVX2 copy vectorises it too.
#[inline(always)]
pub fn wht(x: &mut [f32]) {
    let len = x.len();
    assert!(
        len.is_power_of_two(),
        "WHT length {len} is not a power of two"
    );
    let mut h = 1;
    while h < len {
        // The short strides at a length known here, so that they unroll; the same butterflies.
        match h {
            1 => butterflies::<1>(x),
            2 => butterflies::<2>(x),
            4 => butterflies::<4>(x),
            _ => {
                for pair in x.chunks_exact_mut(2 * h) {
                    let (a, b) = pair.split_at_mut(h);
                    for (u, v) in a.iter_mut().zip(b) {
                        (*u, *v) = (*u + *v, *u - *v);
                    }
                }
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (len as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= norm);
}

/// One stage of [`wht`] at stride `H`: `(x[i], x[i+H]) ← (x[i] + x[i+H], x[i] − x[i+H])`.
#[inline(always)]
fn butterflies<const H: usize>(x: &mut [f32]) {
    for pair in x.chunks_exact_mut(2 * H) {
        for i in 0..H {
            let (u, v) = (pair[i], pair[i + H]);
            (pair[i], pair[i + H]) = (u + v, u - v);
        }
    }
}

/// The rotation of one token: [`wht`] over power-of-two sub-blocks, largest first
/// (80 = 64 + 16, 96 = 64 + 32, 112 = 64 + 32 + 16; a power of two is one block).
/// Block-diagonal of orthonormal symmetric blocks, so also its own inverse.
#[inline(always)]
pub fn rotate(x: &mut [f32]) {
    let mut rest = x;
    while !rest.is_empty() {
        let (block, tail) = rest.split_at_mut(1 << rest.len().ilog2());
        wht(block);
        rest = tail;
    }
}

/// The min-max groups of a token of `d` rotated values; the last may be shorter.
pub(crate) fn groups(d: usize) -> impl Iterator<Item = Range<usize>> {
    (0..d).step_by(GROUP).map(move |s| s..(s + GROUP).min(d))
}

/// Offset of the codes in a token record: after its group pairs.
pub(crate) fn codes_at(d: usize) -> usize {
    d.div_ceil(GROUP) * PAIR
}

/// Bytes of one quantized token: its group pairs, then its codes.
pub(crate) fn record_len(d: usize, bits: usize) -> usize {
    codes_at(d) + packed_len(d, bits)
}

/// Group `g`'s stored parameters in a token record.
pub(crate) fn group_params(record: &[u8], g: usize) -> MinMax {
    MinMax {
        lo: get_f16(record, 2 * g),
        step: get_f16(record, 2 * g + 1),
    }
}

/// One token of a stored block.
pub(crate) enum Token<'a> {
    /// A quantized record: pairs, then codes.
    Quantized(&'a [u8]),
    /// An f16 row.
    Protected(&'a [u8]),
}

/// The tokens of a stored block, in order.
pub(crate) fn tokens(block: &[u8], shape: Shape, bits: usize) -> impl Iterator<Item = Token<'_>> {
    let (n, d) = (shape.n, shape.d);
    let n_p = u32::from_le_bytes([block[0], block[1], block[2], block[3]]) as usize;
    let rec = record_len(d, bits);
    let rows_at = HEADER + (n - n_p) * rec;
    let mask = (n_p > 0).then(|| &block[rows_at + n_p * 2 * d..]);
    let (mut k, mut m) = (0, 0);
    (0..n).map(move |t| {
        if mask.is_some_and(|mask| unpack_bits(mask, 1, t) == 1) {
            let at = rows_at + m * 2 * d;
            m += 1;
            Token::Protected(&block[at..at + 2 * d])
        } else {
            let at = HEADER + k * rec;
            k += 1;
            Token::Quantized(&block[at..at + rec])
        }
    })
}

fn block_size<const BITS: usize>(shape: Shape, n_protected: usize) -> BlockSize {
    let (n, d) = (shape.n, shape.d);
    let n_p = n_protected.min(n);
    let n_q = n - n_p;
    let mask = if n_p > 0 { packed_len(n, 1) } else { 0 };
    BlockSize {
        codes: n_q * packed_len(d, BITS) + n_p * 2 * d,
        meta: HEADER + n_q * codes_at(d) + mask,
    }
}

// Inlined into `kv::simd`'s copy compiled for AVX2 (same source, same bytes).
#[inline(always)]
fn quantize<const BITS: usize>(
    x: &[f32],
    shape: Shape,
    protect: &[bool],
    params: &QuantParams,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    check_input(x, shape, protect)?;
    let clip = params.had_clip;
    if !(clip > 0.0 && clip <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "had_clip {clip} is outside (0, 1]"
        )));
    }
    let start = out.len();
    let written = write_block::<BITS>(x, shape, protect, clip, out);
    if written.is_err() {
        out.truncate(start);
    }
    written
}

/// The block after the checks; on error the caller drops what was appended.
#[inline(always)]
fn write_block<const BITS: usize>(
    x: &[f32],
    shape: Shape,
    protect: &[bool],
    clip: f32,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let (n, d) = (shape.n, shape.d);
    let levels = (1u32 << BITS) - 1;
    let is_protected = |t: usize| protect.get(t).copied().unwrap_or(false);
    let n_p = (0..n).filter(|&t| is_protected(t)).count();
    let n_p32 = u32::try_from(n_p)
        .map_err(|_| Error::Unsupported(format!("{n_p} protected tokens in one block")))?;
    out.reserve(block_size::<BITS>(shape, n_p).total());
    out.extend_from_slice(&n_p32.to_le_bytes());

    let mut y = vec![0f32; d];
    let mut codes = vec![0u8; d];
    for t in (0..n).filter(|&t| !is_protected(t)) {
        y.copy_from_slice(&x[t * d..(t + 1) * d]);
        rotate(&mut y);
        for r in groups(d) {
            let (min, max) = range(&y[r.clone()]);
            let mm = MinMax::new(clip * min, clip * max, levels);
            stored_f16(mm.lo)?;
            stored_f16(mm.step)?;
            put_f16(out, mm.lo);
            put_f16(out, mm.step);
            for (c, &v) in codes[r.clone()].iter_mut().zip(&y[r]) {
                *c = mm.code(v, levels);
            }
        }
        pack_bits(&codes, BITS, out);
    }
    for t in (0..n).filter(|&t| is_protected(t)) {
        let row = &x[t * d..(t + 1) * d];
        row.iter().for_each(|&v| put_f16(out, v));
    }
    if n_p > 0 {
        let mask: Vec<u8> = (0..n).map(|t| is_protected(t) as u8).collect();
        pack_bits(&mask, 1, out);
    }
    Ok(())
}

/// The rotated reconstruction `ŷ` of a quantized record.
fn decode<const BITS: usize>(record: &[u8], y: &mut [f32]) {
    let codes = &record[codes_at(y.len())..];
    for (g, r) in groups(y.len()).enumerate() {
        let mm = group_params(record, g);
        for j in r {
            y[j] = mm.value(unpack_bits(codes, BITS, j));
        }
    }
}

fn dequantize<const BITS: usize>(block: &[u8], shape: Shape, out: &mut [f32]) {
    let d = shape.d;
    for (tok, o) in tokens(block, shape, BITS).zip(out.chunks_exact_mut(d)) {
        match tok {
            Token::Quantized(rec) => {
                decode::<BITS>(rec, o);
                rotate(o);
            }
            Token::Protected(row) => {
                for (c, v) in o.iter_mut().enumerate() {
                    *v = get_f16(row, c);
                }
            }
        }
    }
}

fn scores<const BITS: usize>(block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
    let d = shape.d;
    // q·R(ŷ) = (Rq)·ŷ, R symmetric orthonormal: rotate the query once, not every token.
    let mut qr = q[..d].to_vec();
    rotate(&mut qr);
    let q_sums: Vec<f32> = groups(d).map(|r| qr[r].iter().sum()).collect();
    for (tok, o) in tokens(block, shape, BITS).zip(out.iter_mut()) {
        *o = match tok {
            Token::Quantized(rec) => {
                let codes = &rec[codes_at(d)..];
                groups(d)
                    .enumerate()
                    .map(|(g, r)| {
                        let mm = group_params(rec, g);
                        let dot: f32 = r.map(|j| qr[j] * unpack_bits(codes, BITS, j) as f32).sum();
                        mm.step * dot + mm.lo * q_sums[g]
                    })
                    .sum()
            }
            Token::Protected(row) => (0..d).map(|c| q[c] * get_f16(row, c)).sum(),
        };
    }
}

fn accumulate<const BITS: usize>(block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
    let d = shape.d;
    // Σ p_t·R(ŷ_t) = R(Σ p_t·ŷ_t): sum in the rotated basis, rotate back once.
    let mut acc = vec![0f32; d];
    let mut y = vec![0f32; d];
    for (tok, &pt) in tokens(block, shape, BITS).zip(p) {
        match tok {
            Token::Quantized(rec) => {
                decode::<BITS>(rec, &mut y);
                acc.iter_mut().zip(&y).for_each(|(a, &v)| *a += pt * v);
            }
            Token::Protected(row) => {
                for (c, o) in out[..d].iter_mut().enumerate() {
                    *o += pt * get_f16(row, c);
                }
            }
        }
    }
    rotate(&mut acc);
    out[..d].iter_mut().zip(&acc).for_each(|(o, &a)| *o += a);
}

/// Implements [`Format`] for a unit struct at a code width.
macro_rules! had_format {
    ($name:ident, $bits:literal) => {
        impl Format for $name {
            fn block_size(
                &self,
                shape: Shape,
                n_protected: usize,
                _params: &QuantParams,
            ) -> BlockSize {
                block_size::<$bits>(shape, n_protected)
            }
            fn protects(&self) -> bool {
                true
            }
            #[inline(always)]
            fn quantize(
                &self,
                x: &[f32],
                shape: Shape,
                protect: &[bool],
                params: &QuantParams,
                out: &mut Vec<u8>,
            ) -> Result<(), Error> {
                quantize::<$bits>(x, shape, protect, params, out)
            }
            fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]) {
                dequantize::<$bits>(block, shape, out)
            }
            fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
                scores::<$bits>(block, shape, q, out)
            }
            fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
                accumulate::<$bits>(block, shape, p, out)
            }
        }
    };
}

/// AKVQ-VL at 2 bits per rotated value (visual tokens).
pub struct Q2Had;
had_format!(Q2Had, 2);

/// AKVQ-VL at 4 bits per rotated value (text tokens).
pub struct Q4Had;
had_format!(Q4Had, 4);
