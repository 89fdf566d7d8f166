//! `kivi2`: to be written (see issue 3).

use crate::Error;
use crate::kv::format::{BlockSize, Format, QuantParams, Shape};

pub struct Kivi2;

impl Format for Kivi2 {
    fn block_size(&self, _shape: Shape, _n_protected: usize) -> BlockSize {
        todo!()
    }
    fn quantize(
        &self,
        _x: &[f32],
        _shape: Shape,
        _protect: &[bool],
        _params: &QuantParams,
        _out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        todo!()
    }
    fn dequantize(&self, _block: &[u8], _shape: Shape, _out: &mut [f32]) {
        todo!()
    }
    fn scores(&self, _block: &[u8], _shape: Shape, _q: &[f32], _out: &mut [f32]) {
        todo!()
    }
    fn accumulate(&self, _block: &[u8], _shape: Shape, _p: &[f32], _out: &mut [f32]) {
        todo!()
    }
}
