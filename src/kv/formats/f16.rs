//! `f16`: plain half precision, token-major. The reference every other format is measured
//! against.
//!
//! Layout: `n * d` little-endian f16 values, `x[t][c]` at index `t * d + c`.

use super::pack::{get_f16, put_f16};
use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Shape, check_input};

pub struct F16;

impl Format for F16 {
    fn block_size(&self, shape: Shape, _n_protected: usize, _params: &QuantParams) -> BlockSize {
        BlockSize {
            codes: 2 * shape.n * shape.d,
            meta: 0,
        }
    }

    fn quantize(
        &self,
        x: &[f32],
        shape: Shape,
        protect: &[bool],
        _params: &QuantParams,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        check_input(x, shape, protect)?;
        out.reserve(2 * x.len());
        x.iter().for_each(|&v| put_f16(out, v));
        Ok(())
    }

    fn dequantize(&self, block: &[u8], shape: Shape, out: &mut [f32]) {
        for (i, o) in out[..shape.n * shape.d].iter_mut().enumerate() {
            *o = get_f16(block, i);
        }
    }

    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32]) {
        let d = shape.d;
        for (t, o) in out[..shape.n].iter_mut().enumerate() {
            *o = (0..d).map(|c| q[c] * get_f16(block, t * d + c)).sum();
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], out: &mut [f32]) {
        let d = shape.d;
        for (t, &pt) in p[..shape.n].iter().enumerate() {
            for (c, o) in out[..d].iter_mut().enumerate() {
                *o += pt * get_f16(block, t * d + c);
            }
        }
    }
}
