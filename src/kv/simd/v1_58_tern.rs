//! Fast `v1_58_tern` sums (see `formats/v1_58_tern.rs`), straight from the codes: channels
//! are lanes; a trit byte of `L` channels is widened once per token and its digit read by
//! TQ1_0's multiply-and-shift, and every head's softmax weight is added under it with the
//! accumulators in registers ([`channel_sums`]). The per-channel scales apply once per block.
//! Salient tokens' 2-bit codes are summed the same way. Scores (never asked of a value
//! format) run the reference.

use std::marker::PhantomData;

use super::f16::f16s_to_f32;
use super::lanes::{self, Codes, Lanes, Packed, Sums, channel_sums};
use super::{Kernel, PerHead};
use crate::kv::formats::v1_58_tern::{Layout, Row};
use crate::kv::{FormatId, Shape};

/// The kernels on lanes `V`.
pub(crate) struct V1_58TernFast<V>(pub(crate) PhantomData<V>);

impl<V: Lanes + Sync> Kernel for V1_58TernFast<V> {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        PerHead(FormatId::V1_58Tern).scores(block, shape, q, out, stride)
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        // SAFETY: `kernel` hands out `V`'s kernels only where its features are present.
        unsafe { lanes::sums::<V, Values>(block, shape, p, stride, out) }
    }
}

struct Values;

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
        let l = Layout::read(block, shape);
        let n_u = n - l.n_p;
        // Softmax weights of the ternary tokens, then of the salient ones, interleaved by head.
        let (mut wu, mut wp) = (vec![0f32; H * n_u], vec![0f32; H * l.n_p]);
        l.for_tokens(block, n, |t, row| {
            let (w, i) = match row {
                Row::Ternary(u) => (&mut wu, u),
                Row::Protected(r) => (&mut wp, r),
            };
            for h in 0..H {
                w[i * H + h] = p[h * stride + t];
            }
        });
        let (mut terns, mut codes) = (vec![0f32; H * d], vec![0f32; H * d]);
        let trits = Trits {
            base: block[l.trits..l.trits + n_u.div_ceil(5) * d].as_ptr(),
            d,
        };
        let salient = Packed::<2> {
            base: block[l.protected..l.protected + l.n_p * d / 4].as_ptr(),
            first: 0,
            stride: d / 4,
        };
        // SAFETY: each row read lies in its part of the block (sliced above).
        unsafe {
            channel_sums::<V, H>(0..d, n_u, &trits, &wu, &mut terns, d);
            channel_sums::<V, H>(0..d, l.n_p, &salient, &wp, &mut codes, d);
        }
        let mut sum_p = [0f32; H];
        for (h, s) in sum_p.iter_mut().enumerate() {
            *s = wp.iter().skip(h).step_by(H).sum();
        }
        let (mut gamma, mut pairs) = ([0f32; 256], [0f32; 512]);
        f16s_to_f32(&block[l.gamma..l.gamma + 2 * d], &mut gamma[..d]);
        if l.n_p > 0 {
            f16s_to_f32(&block[l.minmax..l.minmax + 4 * d], &mut pairs[..2 * d]);
        }
        for h in 0..H {
            for c in 0..d {
                let (lo, step) = (pairs[2 * c], pairs[2 * c + 1]);
                let v = terns[h * d + c] * gamma[c] + codes[h * d + c] * step + sum_p[h] * lo;
                out[h * d + c] += v;
            }
        }
    }
}

/// The trit rows of a block: row `u`'s trits of `L` channels from `c`, as −1, 0 or 1.
struct Trits {
    base: *const u8,
    d: usize,
}

impl Codes for Trits {
    #[inline(always)]
    unsafe fn at<V: Lanes>(&self, u: usize, c: usize) -> V::F {
        // SAFETY: the caller's trit rows hold `L` bytes from channel `c`.
        unsafe {
            let b = V::bytes(self.base.add(u / 5 * self.d + c));
            let m = V::and(V::mullo(b, V::splat_i(POW3[u % 5])), V::splat_i(0xFF));
            let digit = V::cvt(V::srl(V::mullo(m, V::splat_i(3)), 8));
            V::add(digit, V::splat(-1.0))
        }
    }
}

const POW3: [i32; 5] = [1, 3, 9, 27, 81];
