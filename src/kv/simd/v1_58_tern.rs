//! Fast `v1_58_tern` (see `formats/v1_58_tern.rs`): a token's trits are decoded for all
//! channels at once (TQ1_0's multiply-and-shift, byte lanes) into a row of −1/0/1 that every
//! head reads; the per-channel scales are folded into each head's query once per block
//! (scores) or applied once per block (sums). Salient tokens decode their 2-bit codes the
//! same way. Plain Rust compiled for AVX2 and FMA around the row helpers.

use super::Kernel;
use super::q2_had::unpack;
use super::rows::{Tile, store_dots};
use crate::kv::Shape;
use crate::kv::formats::v1_58_tern::{Layout, Row};

/// AVX2 and FMA.
pub struct V1_58TernAvx2;

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Signed trits (−1, 0, 1) of digit `i` of a row of trit bytes.
#[inline(always)]
fn trits(bytes: &[u8], i: usize, out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(bytes) {
        let digit = ((b.wrapping_mul(POW3[i]) as u16 * 3) >> 8) as u8;
        *o = digit as f32 - 1.0;
    }
}

impl Kernel for V1_58TernAvx2 {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        // SAFETY: `kernel` hands out this path only where `Isa::Avx2` is supported.
        unsafe { scores_avx2(block, shape, q, out, stride) }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        // SAFETY: as in `scores`.
        unsafe { accumulate_avx2(block, shape, p, stride, out) }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
    let (n, d) = (shape.n, shape.d);
    let l = Layout::read(block, shape);
    let nh = q.len() / d;
    let gamma: Vec<f32> = (0..d).map(|c| l.gamma(block, c)).collect();
    let q_gamma: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &x)| x * gamma[i % d])
        .collect();
    let (mut q_step, mut base) = (vec![0f32; nh * d], vec![0f32; nh]);
    if l.n_p > 0 {
        for c in 0..d {
            let m = l.minmax(block, c);
            for h in 0..nh {
                q_step[h * d + c] = q[h * d + c] * m.step;
                base[h] += q[h * d + c] * m.lo;
            }
        }
    }
    let mut row = [0f32; 256];
    let row = &mut row[..d];
    l.for_tokens(block, n, |t, rank| {
        let (w, b) = match rank {
            Row::Ternary(u) => {
                trits(&block[l.trits + (u / 5) * d..], u % 5, row);
                (&q_gamma, &[][..])
            }
            Row::Protected(r) => {
                unpack::<2>(&block[l.protected + r * d / 4..], row);
                (&q_step, &base[..])
            }
        };
        // SAFETY: AVX2 and FMA are enabled here.
        unsafe { store_dots(w, b, row, out, stride, t) };
    });
}

#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2(block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
    let (n, d) = (shape.n, shape.d);
    let l = Layout::read(block, shape);
    let nh = out.len() / d;
    // Σ_t p_t·trit and Σ_t p_t·code per head and channel, scaled once at the end.
    let (mut tern, mut codes, mut p_prot) =
        (vec![0f32; nh * d], vec![0f32; nh * d], vec![0f32; nh]);
    let (mut tt, mut tc) = (Tile::new(d), Tile::new(d));
    l.for_tokens(block, n, |t, rank| match rank {
        Row::Ternary(u) => {
            trits(&block[l.trits + (u / 5) * d..], u % 5, tt.next());
            tt.push(t, p, stride, &mut tern);
        }
        Row::Protected(r) => {
            unpack::<2>(&block[l.protected + r * d / 4..], tc.next());
            tc.push(t, p, stride, &mut codes);
            for (h, pp) in p_prot.iter_mut().enumerate() {
                *pp += p[h * stride + t];
            }
        }
    });
    tt.flush(p, stride, &mut tern);
    tc.flush(p, stride, &mut codes);
    for c in 0..d {
        let g = l.gamma(block, c);
        let m = (l.n_p > 0).then(|| l.minmax(block, c));
        for h in 0..nh {
            let mut v = tern[h * d + c] * g;
            if let Some(m) = m {
                v += codes[h * d + c] * m.step + p_prot[h] * m.lo;
            }
            out[h * d + c] += v;
        }
    }
}
