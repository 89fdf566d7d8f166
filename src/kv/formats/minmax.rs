//! Asymmetric min-max quantization, the building block of KIVI, VidKV's 2-bit channels,
//! protected tokens and AKVQ-VL: `s = (hi - lo) / levels`, `q = round(clamp((x - lo) / s,
//! 0, levels))`, `x̂ = q·s + lo`, with `lo` and `s` stored as f16.

use super::pack::round_f16;

/// The stored (f16-rounded) offset and step of one min-max group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MinMax {
    pub lo: f32,
    pub step: f32,
}

impl MinMax {
    /// Parameters for the range `[lo, hi]` at `levels` = 2^bits − 1. Codes are computed
    /// against the f16-rounded values actually stored, so decoding is exact to them.
    pub fn new(lo: f32, hi: f32, levels: u32) -> MinMax {
        MinMax {
            lo: round_f16(lo),
            step: round_f16((hi - lo) / levels as f32),
        }
    }

    /// The range of `values`, then [`MinMax::new`].
    pub fn over(values: impl Iterator<Item = f32>, levels: u32) -> MinMax {
        let (lo, hi) = values.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        MinMax::new(lo, hi, levels)
    }

    #[inline]
    pub fn code(self, x: f32, levels: u32) -> u8 {
        if self.step > 0.0 {
            ((x - self.lo) / self.step)
                .clamp(0.0, levels as f32)
                .round() as u8
        } else {
            0
        }
    }

    #[inline]
    pub fn value(self, code: u8) -> f32 {
        code as f32 * self.step + self.lo
    }
}
