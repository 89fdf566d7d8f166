//! `k1_5_mix`: the VidKV key format. Per block, the `Dh` channels of widest range get 2-bit
//! per-channel min-max; the other `Dl` channels of each token, gathered in channel order,
//! go through a real FFT of length `Dl`, and each of the `Dl` real numbers that describe
//! the spectrum is kept at 1 bit (its sign) with a per-coefficient scale `mean_t |coef|`.
//! Unlike the published code (a full complex FFT at 2 bits per "1-bit" channel), this
//! spends exactly 1 bit per low-range value.
//!
//! Coefficients of `z = rfft(x_lo)` (unnormalised, `Z_k = Σ_n z_n e^{-2πikn/Dl}`), in order:
//! `Re Z_0, Re Z_{Dl/2}, Re Z_1, Im Z_1, …, Re Z_{Dl/2-1}, Im Z_{Dl/2-1}`.
//!
//! Layout (little-endian):
//! - channel mask, `d / 8` bytes, bit `c % 8` of byte `c / 8` set for a 2-bit channel;
//! - per 2-bit channel, ascending: min-max offset and step, f16 each;
//! - per coefficient: scale, f16;
//! - per token: the 2-bit codes of the 2-bit channels, ascending (`Dh / 4` bytes, code `j`
//!   at bits `2(j % 4)` of byte `j / 4`), then the coefficient sign bits (`Dl / 8` bytes,
//!   bit `k % 8` of byte `k / 8` set when coefficient `k` ≥ 0).

use std::cell::RefCell;
use std::sync::Arc;

use half::f16;
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use super::minmax::MinMax;
use super::pack::{get_f16, pack_bits, packed_len, put_f16, stored_f16, unpack_bits};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Shape, check_input};

pub struct K1_5Mix;

/// Levels of the 2-bit min-max channels.
const LEVELS: u32 = 3;

thread_local! {
    // The planner caches plans by length, so each length is planned once per thread.
    static PLANNER: RefCell<RealFftPlanner<f64>> = RefCell::new(RealFftPlanner::new());
    // The last length's transform with its buffers, for `Spectrum::with`.
    static SPECTRUM: RefCell<Option<Spectrum>> = const { RefCell::new(None) };
}

fn forward_plan(len: usize) -> Arc<dyn RealToComplex<f64>> {
    PLANNER.with(|p| p.borrow_mut().plan_fft_forward(len))
}

fn inverse_plan(len: usize) -> Arc<dyn ComplexToReal<f64>> {
    PLANNER.with(|p| p.borrow_mut().plan_fft_inverse(len))
}

/// Number of 2-bit channels: `mix_fraction·d` rounded (half away from zero) to a multiple
/// of 8, so that `d - Dh` is a multiple of 8 too.
pub fn high_channels(d: usize, mix_fraction: f32) -> Result<usize, Error> {
    if !(0.25..=0.75).contains(&mix_fraction) {
        return Err(Error::InvalidArgument(format!(
            "mix_fraction {mix_fraction} is outside 0.25..=0.75"
        )));
    }
    Ok((mix_fraction as f64 * d as f64 / 8.0).round() as usize * 8)
}

/// A forward real FFT of one length with its buffers: a block plans once and allocates
/// once, whatever its number of tokens (the arithmetic is the plan's either way).
pub(crate) struct Spectrum {
    plan: Arc<dyn RealToComplex<f64>>,
    input: Vec<f64>,
    bins: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
}

impl Spectrum {
    pub(crate) fn new(len: usize) -> Spectrum {
        let plan = forward_plan(len);
        Spectrum {
            input: plan.make_input_vec(),
            bins: plan.make_output_vec(),
            scratch: plan.make_scratch_vec(),
            plan,
        }
    }

    /// Runs `f` with this thread's transform of length `len`, made anew only when the length
    /// changes: a cache's blocks share one `Dl`, so the fast scores of a block allocate no
    /// transform buffers (they were a tenth of its time). A call inside `f` gets a fresh one.
    pub(crate) fn with<R>(len: usize, f: impl FnOnce(&mut Spectrum) -> R) -> R {
        SPECTRUM.with(|cell| match cell.try_borrow_mut() {
            Ok(mut cached) => {
                let spectrum = match &mut *cached {
                    Some(s) if s.input.len() == len => s,
                    slot => slot.insert(Spectrum::new(len)),
                };
                f(spectrum)
            }
            Err(_) => f(&mut Spectrum::new(len)),
        })
    }

    /// The `Dl` coefficients of the real signal `z` (`Dl` values), in the order the module
    /// doc gives.
    pub(crate) fn analyze(&mut self, z: impl IntoIterator<Item = f64>, coef: &mut [f64]) {
        let len = self.input.len();
        let mut filled = 0;
        self.input.iter_mut().zip(z).for_each(|(i, v)| {
            *i = v;
            filled += 1;
        });
        debug_assert_eq!(filled, len, "a signal of the transform's length");
        self.plan
            .process_with_scratch(&mut self.input, &mut self.bins, &mut self.scratch)
            .expect("buffers sized by the plan");
        let bins = &self.bins;
        coef[0] = bins[0].re;
        coef[1] = bins[len / 2].re;
        for k in 1..len / 2 {
            coef[2 * k] = bins[k].re;
            coef[2 * k + 1] = bins[k].im;
        }
    }

    /// The adjoint of [`synthesize`] applied to `q_lo`: `w` with `Σ_k w_k·coef_k = q_lo · z`
    /// for every `coef`, so a score needs no inverse FFT per token. With `Q = rfft(q_lo)`:
    /// `w = (Re Q_0, Re Q_{Dl/2}, 2 Re Q_1, 2 Im Q_1, …) / Dl`.
    pub(crate) fn adjoint(&mut self, q_lo: impl IntoIterator<Item = f32>, w: &mut [f64]) {
        let len = w.len() as f64;
        self.analyze(q_lo.into_iter().map(|v| v as f64), w);
        w[0] /= len;
        w[1] /= len;
        w[2..].iter_mut().for_each(|v| *v *= 2.0 / len);
    }
}

/// The low-range channels `z` whose spectrum coefficients are `coef`: inverse rfft / `Dl`.
///
/// # Panics
/// If `coef.len()` is odd or below 2, or `z` is not as long (a block's `Dl` never is).
pub fn synthesize(coef: &[f64], z: &mut [f64]) {
    let len = coef.len();
    let plan = inverse_plan(len);
    let mut bins = plan.make_input_vec();
    bins[0] = Complex::new(coef[0], 0.0);
    bins[len / 2] = Complex::new(coef[1], 0.0);
    for k in 1..len / 2 {
        bins[k] = Complex::new(coef[2 * k], coef[2 * k + 1]);
    }
    plan.process(&mut bins, z)
        .expect("buffers sized by the plan, DC and Nyquist real");
    z.iter_mut().for_each(|v| *v /= len as f64);
}

/// [`Spectrum::adjoint`] of `q_lo` (`w` as long).
///
/// # Panics
/// If `q_lo.len()` is odd or below 2, or `w` is not as long.
pub fn adjoint(q_lo: &[f32], w: &mut [f64]) {
    assert_eq!(q_lo.len(), w.len());
    Spectrum::new(q_lo.len()).adjoint(q_lo.iter().copied(), w);
}

/// Where each part of a block starts, and which channels are which.
pub(crate) struct Layout {
    /// 2-bit channels, ascending.
    pub(crate) hi: Vec<usize>,
    /// FFT channels, ascending.
    pub(crate) lo: Vec<usize>,
    pub(crate) params: usize,
    pub(crate) scales: usize,
    pub(crate) codes: usize,
    /// Bytes of one token's codes.
    pub(crate) stride: usize,
}

impl Layout {
    fn new(mask: &[bool]) -> Layout {
        let d = mask.len();
        let hi: Vec<usize> = (0..d).filter(|&c| mask[c]).collect();
        let lo: Vec<usize> = (0..d).filter(|&c| !mask[c]).collect();
        let params = packed_len(d, 1);
        let scales = params + 4 * hi.len();
        let codes = scales + 2 * lo.len();
        let stride = packed_len(hi.len(), 2) + packed_len(lo.len(), 1);
        Layout {
            hi,
            lo,
            params,
            scales,
            codes,
            stride,
        }
    }

    pub(crate) fn read(block: &[u8], d: usize) -> Layout {
        let mask: Vec<bool> = (0..d).map(|c| unpack_bits(block, 1, c) == 1).collect();
        Layout::new(&mask)
    }

    /// Min-max of the `j`-th 2-bit channel.
    pub(crate) fn minmax(&self, block: &[u8], j: usize) -> MinMax {
        let p = &block[self.params..];
        MinMax {
            lo: get_f16(p, 2 * j),
            step: get_f16(p, 2 * j + 1),
        }
    }

    pub(crate) fn scale(&self, block: &[u8], k: usize) -> f64 {
        get_f16(&block[self.scales..], k) as f64
    }

    /// 2-bit code of token `t`, `j`-th 2-bit channel.
    #[inline]
    fn code(&self, block: &[u8], t: usize, j: usize) -> u8 {
        unpack_bits(&block[self.codes + t * self.stride..], 2, j)
    }

    /// Sign (±1) of token `t`, coefficient `k`.
    #[inline]
    fn sign(&self, block: &[u8], t: usize, k: usize) -> f64 {
        let bits = self.codes + t * self.stride + packed_len(self.hi.len(), 2);
        if unpack_bits(&block[bits..], 1, k) == 1 {
            1.0
        } else {
            -1.0
        }
    }

    fn size(&self, n: usize) -> BlockSize {
        BlockSize {
            codes: n * self.stride,
            meta: self.codes,
        }
    }
}

impl Format for K1_5Mix {
    fn block_size(&self, shape: Shape, _n_protected: usize, params: &QuantParams) -> BlockSize {
        // `quantize` rejects a fraction out of range, so no block of that size exists.
        let dh = high_channels(shape.d, params.mix_fraction).unwrap_or(shape.d / 2);
        let mask: Vec<bool> = (0..shape.d).map(|c| c < dh).collect();
        Layout::new(&mask).size(shape.n)
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
        let (n, d) = (shape.n, shape.d);
        let dh = high_channels(d, params.mix_fraction)?;

        // Each channel's range, a row at a time (in token order, as a fold per channel).
        let (mut lo, mut hi) = (vec![f32::INFINITY; d], vec![f32::NEG_INFINITY; d]);
        for row in x.chunks_exact(d) {
            for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                (*l, *h) = (l.min(v), h.max(v));
            }
        }
        let range: Vec<f32> = hi.iter().zip(&lo).map(|(h, l)| h - l).collect();
        // Widest range first, ties to the lower channel.
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| range[b].total_cmp(&range[a]).then(a.cmp(&b)));
        let mut mask = vec![false; d];
        order[..dh].iter().for_each(|&c| mask[c] = true);
        let l = Layout::new(&mask);
        let dl = l.lo.len();

        let ranges: Vec<MinMax> =
            l.hi.iter()
                .map(|&c| MinMax::new(lo[c], hi[c], LEVELS))
                .collect();

        let mut coef = vec![0f64; n * dl];
        let mut spectrum = Spectrum::new(dl);
        for t in 0..n {
            let z = l.lo.iter().map(|&c| x[t * d + c] as f64);
            spectrum.analyze(z, &mut coef[t * dl..(t + 1) * dl]);
        }
        let mut abs_sums = vec![0f64; dl];
        for row in coef.chunks_exact(dl) {
            abs_sums
                .iter_mut()
                .zip(row)
                .for_each(|(s, v)| *s += v.abs());
        }
        let scales = abs_sums
            .iter()
            .map(|&sum| stored_f16(f16::from_f64(sum / n as f64).to_f32()))
            .collect::<Result<Vec<f32>, Error>>()?;

        let start = out.len();
        out.reserve(l.size(n).total());
        let flags: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
        pack_bits(&flags, 1, out);
        for m in &ranges {
            put_f16(out, m.lo);
            put_f16(out, m.step);
        }
        scales.iter().for_each(|&s| put_f16(out, s));
        let mut codes = vec![0u8; l.hi.len()];
        let mut bits = vec![0u8; dl];
        // The 2-bit channels of a token gathered first and the ranges apart, so that the
        // codes vectorise.
        let mut high = vec![0f32; l.hi.len()];
        let (los, steps): (Vec<f32>, Vec<f32>) = ranges.iter().map(|m| (m.lo, m.step)).unzip();
        for (row, spectrum) in x.chunks_exact(d).zip(coef.chunks_exact(dl)) {
            high.iter_mut().zip(&l.hi).for_each(|(v, &c)| *v = row[c]);
            for (((code, &v), &lo), &step) in codes.iter_mut().zip(&high).zip(&los).zip(&steps) {
                *code = MinMax { lo, step }.code(v, LEVELS);
            }
            for (bit, &v) in bits.iter_mut().zip(spectrum) {
                *bit = (v >= 0.0) as u8;
            }
            pack_bits(&codes, 2, out);
            pack_bits(&bits, 1, out);
        }
        debug_assert_eq!(out.len() - start, l.size(n).total());
        Ok(())
    }

    fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]) {
        let d = shape.d;
        let l = Layout::read(block, d);
        let dl = l.lo.len();
        let ranges: Vec<MinMax> = (0..l.hi.len()).map(|j| l.minmax(block, j)).collect();
        let (mut coef, mut z) = (vec![0f64; dl], vec![0f64; dl]);
        for t in 0..shape.n {
            let row = &mut out[t * d..(t + 1) * d];
            for (j, (&c, m)) in l.hi.iter().zip(&ranges).enumerate() {
                row[c] = m.value(l.code(block, t, j));
            }
            for (k, v) in coef.iter_mut().enumerate() {
                *v = l.sign(block, t, k) * l.scale(block, k);
            }
            synthesize(&coef, &mut z);
            for (&c, &v) in l.lo.iter().zip(&z) {
                row[c] = v as f32;
            }
        }
    }

    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
        let l = Layout::read(block, shape.d);
        let dl = l.lo.len();
        // Per block: the query through the adjoint, times the scales; the steps times the
        // query and the offsets' constant term.
        let mut w = vec![0f64; dl];
        Spectrum::new(dl).adjoint(l.lo.iter().map(|&c| q[c]), &mut w);
        let w_scaled: Vec<f64> = (0..dl).map(|k| w[k] * l.scale(block, k)).collect();
        let mut base = 0f64;
        let q_step: Vec<f64> =
            l.hi.iter()
                .enumerate()
                .map(|(j, &c)| {
                    let m = l.minmax(block, j);
                    base += q[c] as f64 * m.lo as f64;
                    q[c] as f64 * m.step as f64
                })
                .collect();
        for (t, o) in out[..shape.n].iter_mut().enumerate() {
            let hi: f64 = (0..q_step.len())
                .map(|j| q_step[j] * l.code(block, t, j) as f64)
                .sum();
            let lo: f64 = (0..dl).map(|k| w_scaled[k] * l.sign(block, t, k)).sum();
            *o = (base + hi + lo) as f32;
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
        let l = Layout::read(block, shape.d);
        let dl = l.lo.len();
        // Σ_t p_t·code and Σ_t p_t·sign, scaled once; one inverse FFT for the whole block.
        let (mut codes, mut signs, mut p_sum) = (vec![0f64; l.hi.len()], vec![0f64; dl], 0f64);
        for (t, &pt) in p[..shape.n].iter().enumerate() {
            let pt = pt as f64;
            p_sum += pt;
            for (j, a) in codes.iter_mut().enumerate() {
                *a += pt * l.code(block, t, j) as f64;
            }
            for (k, a) in signs.iter_mut().enumerate() {
                *a += pt * l.sign(block, t, k);
            }
        }
        for (j, &c) in l.hi.iter().enumerate() {
            let m = l.minmax(block, j);
            out[c] += (codes[j] * m.step as f64 + p_sum * m.lo as f64) as f32;
        }
        let coef: Vec<f64> = (0..dl).map(|k| signs[k] * l.scale(block, k)).collect();
        let mut z = vec![0f64; dl];
        synthesize(&coef, &mut z);
        for (&c, &v) in l.lo.iter().zip(&z) {
            out[c] += v as f32;
        }
    }
}
