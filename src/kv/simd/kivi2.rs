//! Fast `kivi2` (see `formats/kivi2.rs`), straight from the 2-bit codes.
//!
//! Keys: per group of 32 tokens, each head's dot with the offsets is its base; the code words
//! of `L` tokens are gathered once, each code times its channel's step (and its position's
//! power of two, [`code_weights`]) serves every head, and the scores come out as one vector
//! of tokens per head ([`token_dots`]).
//!
//! Values: per token and channel group the offset goes into one sum per head and group
//! ([`group_steps`]); the codes of `L` channels are spread into lanes, times the token's step
//! once for every head, and summed with the heads' accumulators in registers
//! ([`channel_sums`]). Sums of keys and scores of values (never asked) run the reference.

use std::marker::PhantomData;

use super::lanes::{
    self, Lanes, Packed, Scaled, Scores, Sums, channel_sums, code_weights, group_steps, row_index,
    row_weights, splat_each, store_lanes, token_dots,
};
use super::{Kernel, PerHead, dot};
use crate::kv::formats::kivi2::{GROUP, VALUE_GROUP_BYTES, key_group_bytes, value_row_bytes};
use crate::kv::{FormatId, Role, Shape};

/// The kernels on lanes `V`.
pub(crate) struct Kivi2Fast<V>(pub(crate) PhantomData<V>);

impl<V: Lanes + Sync> Kernel for Kivi2Fast<V> {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        match shape.role {
            // SAFETY: `kernel` hands out `V`'s kernels only where its features are present.
            Role::Key => unsafe { lanes::scores::<V, Keys>(block, shape, q, out, stride) },
            Role::Value => PerHead(FormatId::Kivi2).scores(block, shape, q, out, stride),
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        match shape.role {
            Role::Key => PerHead(FormatId::Kivi2).accumulate(block, shape, p, stride, out),
            // SAFETY: as in `scores`.
            Role::Value => unsafe { lanes::sums::<V, Values>(block, shape, p, stride, out) },
        }
    }
}

struct Keys;
struct Values;

impl Scores for Keys {
    #[inline(always)]
    unsafe fn scores<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        q: &[f32],
        out: &mut [f32],
        stride: usize,
    ) {
        let (n, d) = (shape.n, shape.d);
        let (mut lo, mut step) = ([0f32; 256], [0f32; 256]);
        let (lo, step) = (&mut lo[..d], &mut step[..d]);
        // The queries interleaved by head: the weights of every group, whose steps go on the
        // codes instead.
        let mut w = [0f32; 7 * 256];
        for (h, qh) in q.chunks_exact(d).enumerate() {
            for (c, &x) in qh.iter().enumerate() {
                w[c * H + h] = x;
            }
        }
        let cw = const { code_weights::<2>() };
        let mut at = 0;
        for t_group in (0..n).step_by(GROUP) {
            let m = GROUP.min(n - t_group);
            let group = &block[at..at + key_group_bytes(d, m)];
            at += group.len();
            super::f16::f16s_to_f32(&group[..2 * d], lo);
            super::f16::f16s_to_f32(&group[2 * d..4 * d], step);
            step.iter_mut()
                .enumerate()
                .for_each(|(c, s)| *s *= cw[c % 16]);
            let mut base = [0f32; H];
            for (h, b) in base.iter_mut().enumerate() {
                *b = dot(&q[h * d..(h + 1) * d], lo);
            }
            let rows = &group[4 * d..];
            let out = &mut out[t_group..];
            let mut t0 = 0;
            // Two vectors of tokens at a time: each weight broadcast serves both.
            while t0 + V::L < m {
                // SAFETY: as below, for rows `t0..min(t0 + 2L, m)`.
                unsafe { key_dots::<V, H, 2>(rows, d, t0, m, &w, step, &base, out, stride) };
                t0 += 2 * V::L;
            }
            if t0 < m {
                // SAFETY: lanes read rows `t0..m` of the group; `w` holds `H` rows of `d`.
                unsafe { key_dots::<V, H, 1>(rows, d, t0, m, &w, step, &base, out, stride) };
            }
        }
    }
}

/// Scores of the group's rows `t0..min(t0 + N·L, m)` into `out[h·stride + t]`.
///
/// # Safety
/// The CPU has `V`'s features; `rows` holds the group's `m` rows; `w` holds `H` rows of `d`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_dots<V: Lanes, const H: usize, const N: usize>(
    rows: &[u8],
    d: usize,
    t0: usize,
    m: usize,
    w: &[f32],
    step: &[f32],
    base: &[f32; H],
    out: &mut [f32],
    stride: usize,
) {
    let at = |k: usize| t0 + k * V::L;
    let mt = |k: usize| V::L.min(m - at(k));
    // SAFETY: the caller's contract. Loops, not `array::map` (see `splat_each`).
    unsafe {
        let mut idx = [V::splat_i(0); N];
        let mut acc = [[V::zero(); H]; N];
        for k in 0..N {
            idx[k] = row_index::<V>(0, d / 4, at(k), mt(k));
            acc[k] = splat_each::<V, H>(base);
        }
        token_dots::<V, H, 2, N>(rows.as_ptr(), idx, 0, d, w, step, &mut acc);
        for (k, acc) in acc.into_iter().enumerate() {
            for (h, a) in acc.into_iter().enumerate() {
                store_lanes::<V>(&mut out[h * stride + at(k)..][..mt(k)], a);
            }
        }
    }
}

impl Sums for Values {
    #[inline(always)]
    unsafe fn sums<V: Lanes, const H: usize>(
        block: &[u8],
        shape: Shape,
        p: &[f32],
        stride: usize,
        out: &mut [f32],
    ) {
        let (n, d) = (shape.n, shape.d);
        let row = value_row_bytes(d);
        let block = &block[..n * row];
        let w = row_weights::<H>(p, stride, &[], n);
        let mut step = vec![0f32; n];
        for (g, c0) in (0..d).step_by(GROUP).enumerate() {
            let channels = c0..(c0 + GROUP).min(d);
            let at = g * VALUE_GROUP_BYTES;
            // SAFETY: every row's pair and codes lie in `block`.
            let lo_sum = unsafe {
                let ptr = block.as_ptr();
                let lo_sum = group_steps::<V, H>(ptr, at, row, &[], n, p, stride, &mut step);
                // Channel `c` of group `g` is code `c − 32g` of the codes at `at + 4`.
                let codes = Packed::<2> {
                    base: ptr,
                    first: at + 4 - c0 / 4,
                    stride: row,
                };
                let codes = Scaled {
                    codes,
                    scale: &step,
                };
                channel_sums::<V, H>(channels.clone(), n, &codes, &w, out, d);
                lo_sum
            };
            for (h, ls) in lo_sum.iter().enumerate() {
                out[h * d..][channels.clone()]
                    .iter_mut()
                    .for_each(|o| *o += ls);
            }
        }
    }
}
