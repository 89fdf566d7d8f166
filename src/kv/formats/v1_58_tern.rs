//! `v1_58_tern`: the VidKV value format. Per channel over the block's unprotected tokens
//! `γ_c = mean_t |x_tc|` (f16) and `x̂ = clamp(round(x / γ_c), -1, 1)·γ_c`; trits packed
//! five per byte as ggml's TQ1_0 packs them, so a digit decodes by a multiply and a shift.
//! Salient tokens chosen by the caller are stored at 2-bit per-channel min-max instead.
//!
//! Layout (little-endian; `n_p` protected tokens, `n_u = n - n_p`):
//! - `n_p` as u16;
//! - if `n_p > 0`: token mask, `ceil(n / 8)` bytes, bit `t % 8` of byte `t / 8` set when
//!   token `t` is protected;
//! - `γ_c` for every channel, f16 (0 where there is no unprotected token);
//! - if `n_p > 0`: per channel the min-max offset and step over the protected tokens, f16 each;
//! - trits of the unprotected tokens, renumbered `u = 0..n_u` in token order:
//!   `ceil(n_u / 5)·d` bytes, byte `g·d + c` holds channel `c` of tokens `5g..5g+4`
//!   (digit `i` = token `5g + i`); a short last group is padded with digit 1 (value 0);
//! - 2-bit codes of the protected tokens in token order, `d / 4` bytes each, channel `c`
//!   at bits `2(c % 4)` of byte `c / 4`.

use half::f16;

use super::minmax::MinMax;
use super::pack::{get_f16, pack_bits, packed_len, put_f16, unpack_bits};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Shape, check_input};

pub struct V1_58Tern;

/// Levels of the 2-bit min-max used for protected tokens.
const LEVELS: u32 = 3;
/// Trits per byte.
const PER_BYTE: usize = 5;
const POW3: [u8; PER_BYTE] = [1, 3, 9, 27, 81];

/// Pack five base-3 digits (`0..=2`, digit 0 most significant) into one byte the TQ1_0 way:
/// `ceil(v·256/243)` for `v = Σ t_i·3^(4-i)`, so that [`trit_digit`] needs no division.
pub fn pack_trits(digits: [u8; PER_BYTE]) -> u8 {
    let v = digits.iter().fold(0u16, |v, &t| v * 3 + t as u16);
    (v * 256).div_ceil(243) as u8
}

/// Digit `i` (0..5) of a byte made by [`pack_trits`]: multiplying by `3^i` (mod 256) drops
/// the leading `i` digits, and `·3 >> 8` reads the new leading one.
#[inline]
pub fn trit_digit(byte: u8, i: usize) -> u8 {
    ((byte.wrapping_mul(POW3[i]) as u16 * 3) >> 8) as u8
}

/// Where a token's codes are: the `u`-th unprotected or the `p`-th protected token.
#[derive(Clone, Copy)]
pub(crate) enum Row {
    Ternary(usize),
    Protected(usize),
}

/// Where each part of a block starts.
pub(crate) struct Layout {
    d: usize,
    pub(crate) n_p: usize,
    mask: usize,
    pub(crate) gamma: usize,
    pub(crate) minmax: usize,
    pub(crate) trits: usize,
    pub(crate) protected: usize,
    end: usize,
}

impl Layout {
    fn new(shape: Shape, n_p: usize) -> Layout {
        let (n, d) = (shape.n, shape.d);
        let n_p = n_p.min(n);
        let n_u = n - n_p;
        let mask = 2;
        let gamma = mask + if n_p > 0 { packed_len(n, 1) } else { 0 };
        let minmax = gamma + 2 * d;
        let trits = minmax + if n_p > 0 { 4 * d } else { 0 };
        let protected = trits + n_u.div_ceil(PER_BYTE) * d;
        let end = protected + n_p * packed_len(d, 2);
        Layout {
            d,
            n_p,
            mask,
            gamma,
            minmax,
            trits,
            protected,
            end,
        }
    }

    pub(crate) fn read(block: &[u8], shape: Shape) -> Layout {
        Layout::new(shape, u16::from_le_bytes([block[0], block[1]]) as usize)
    }

    fn is_protected(&self, block: &[u8], t: usize) -> bool {
        self.n_p > 0 && unpack_bits(&block[self.mask..], 1, t) == 1
    }

    pub(crate) fn gamma(&self, block: &[u8], c: usize) -> f32 {
        get_f16(&block[self.gamma..], c)
    }

    pub(crate) fn minmax(&self, block: &[u8], c: usize) -> MinMax {
        let p = &block[self.minmax..];
        MinMax {
            lo: get_f16(p, 2 * c),
            step: get_f16(p, 2 * c + 1),
        }
    }

    /// Signed trit (-1, 0, 1) of the `u`-th unprotected token, channel `c`.
    #[inline]
    fn trit(&self, block: &[u8], u: usize, c: usize) -> f32 {
        let byte = block[self.trits + (u / PER_BYTE) * self.d + c];
        trit_digit(byte, u % PER_BYTE) as f32 - 1.0
    }

    /// 2-bit code of the `p`-th protected token, channel `c`.
    #[inline]
    fn code(&self, block: &[u8], p: usize, c: usize) -> u8 {
        let row = self.protected + p * packed_len(self.d, 2);
        unpack_bits(&block[row..], 2, c)
    }

    /// Calls `f(t, row)` for every token `t` of the block, in order.
    pub(crate) fn for_tokens(&self, block: &[u8], n: usize, mut f: impl FnMut(usize, Row)) {
        let (mut u, mut p) = (0, 0);
        for t in 0..n {
            if self.is_protected(block, t) {
                f(t, Row::Protected(p));
                p += 1;
            } else {
                f(t, Row::Ternary(u));
                u += 1;
            }
        }
    }
}

impl Format for V1_58Tern {
    fn block_size(&self, shape: Shape, n_protected: usize, _params: &QuantParams) -> BlockSize {
        let l = Layout::new(shape, n_protected);
        BlockSize {
            codes: l.end - l.trits,
            meta: l.trits,
        }
    }

    fn protects(&self) -> bool {
        true
    }

    // Inlined into `kv::simd`'s copy compiled for AVX2 (same source, same bytes).
    #[inline(always)]
    fn quantize(
        &self,
        x: &[f32],
        shape: Shape,
        protect: &[bool],
        _params: &QuantParams,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        check_input(x, shape, protect)?;
        let (n, d) = (shape.n, shape.d);
        let is_protected = |t: usize| protect.get(t).copied().unwrap_or(false);
        let n_p = (0..n).filter(|&t| is_protected(t)).count();
        let header = u16::try_from(n_p).map_err(|_| {
            Error::Unsupported(format!(
                "{n_p} protected tokens in one block (at most 65535)"
            ))
        })?;
        let l = Layout::new(shape, n_p);
        let start = out.len();
        out.reserve(l.end);

        out.extend_from_slice(&header.to_le_bytes());
        if n_p > 0 {
            let flags: Vec<u8> = (0..n).map(|t| is_protected(t) as u8).collect();
            pack_bits(&flags, 1, out);
        }
        let unprotected: Vec<usize> = (0..n).filter(|&t| !is_protected(t)).collect();
        let protected: Vec<usize> = (0..n).filter(|&t| is_protected(t)).collect();

        // Σ_u |x_uc| a row at a time (in token order, as a sum per channel), in f64.
        let mut abs_sums = vec![0f64; d];
        for &t in &unprotected {
            for (s, &v) in abs_sums.iter_mut().zip(&x[t * d..(t + 1) * d]) {
                *s += v.abs() as f64;
            }
        }
        let mut gamma = vec![0f32; d];
        for (g, &sum) in gamma.iter_mut().zip(&abs_sums) {
            if !unprotected.is_empty() {
                *g = f16::from_f64(sum / unprotected.len() as f64).to_f32();
            }
            put_f16(out, *g);
        }

        let mut ranges = Vec::new();
        if n_p > 0 {
            for c in 0..d {
                let m = MinMax::over(protected.iter().map(|&t| x[t * d + c]), LEVELS);
                put_f16(out, m.lo);
                put_f16(out, m.step);
                ranges.push(m);
            }
        }

        // Each group's bytes built a token (digit) at a time across channels, as `pack_trits`
        // builds one: digit 0 most significant, missing digits 1.
        let mut packed = vec![0u16; d];
        for group in unprotected.chunks(PER_BYTE) {
            packed.fill(0);
            for i in 0..PER_BYTE {
                let row = group.get(i).map(|&t| &x[t * d..(t + 1) * d]);
                for (c, (v, &g)) in packed.iter_mut().zip(&gamma).enumerate() {
                    let digit = match row {
                        Some(r) if g > 0.0 => ((r[c] / g).round().clamp(-1.0, 1.0) + 1.0) as u16,
                        _ => 1,
                    };
                    *v = *v * 3 + digit;
                }
            }
            out.extend(packed.iter().map(|&v| (v * 256).div_ceil(243) as u8));
        }

        for &t in &protected {
            let codes: Vec<u8> = (0..d)
                .map(|c| ranges[c].code(x[t * d + c], LEVELS))
                .collect();
            pack_bits(&codes, 2, out);
        }
        debug_assert_eq!(out.len() - start, l.end);
        Ok(())
    }

    fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]) {
        let l = Layout::read(block, shape);
        let d = shape.d;
        l.for_tokens(block, shape.n, |t, rank| {
            let row = &mut out[t * d..(t + 1) * d];
            for (c, o) in row.iter_mut().enumerate() {
                *o = match rank {
                    Row::Ternary(u) => l.trit(block, u, c) * l.gamma(block, c),
                    Row::Protected(p) => l.minmax(block, c).value(l.code(block, p, c)),
                };
            }
        });
    }

    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
        let l = Layout::read(block, shape);
        let d = shape.d;
        // Fold the per-channel scales into the query once per block.
        let q_gamma: Vec<f64> = (0..d)
            .map(|c| q[c] as f64 * l.gamma(block, c) as f64)
            .collect();
        let (mut q_step, mut base) = (vec![0f64; d], 0f64);
        if l.n_p > 0 {
            for c in 0..d {
                let m = l.minmax(block, c);
                q_step[c] = q[c] as f64 * m.step as f64;
                base += q[c] as f64 * m.lo as f64;
            }
        }
        l.for_tokens(block, shape.n, |t, rank| {
            let s: f64 = match rank {
                Row::Ternary(u) => (0..d)
                    .map(|c| q_gamma[c] * l.trit(block, u, c) as f64)
                    .sum(),
                Row::Protected(p) => {
                    base + (0..d)
                        .map(|c| q_step[c] * l.code(block, p, c) as f64)
                        .sum::<f64>()
                }
            };
            out[t] = s as f32;
        });
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
        let l = Layout::read(block, shape);
        let d = shape.d;
        // Σ_t p_t·trit and Σ_t p_t·code per channel, scaled once at the end.
        let (mut tern, mut codes, mut p_protected) = (vec![0f64; d], vec![0f64; d], 0f64);
        l.for_tokens(block, shape.n, |t, rank| {
            let pt = p[t] as f64;
            match rank {
                Row::Ternary(u) => {
                    for (c, a) in tern.iter_mut().enumerate() {
                        *a += pt * l.trit(block, u, c) as f64;
                    }
                }
                Row::Protected(r) => {
                    p_protected += pt;
                    for (c, a) in codes.iter_mut().enumerate() {
                        *a += pt * l.code(block, r, c) as f64;
                    }
                }
            }
        });
        for (c, o) in out[..d].iter_mut().enumerate() {
            let mut v = tern[c] * l.gamma(block, c) as f64;
            if l.n_p > 0 {
                let m = l.minmax(block, c);
                v += codes[c] * m.step as f64 + p_protected * m.lo as f64;
            }
            *o += v as f32;
        }
    }
}
