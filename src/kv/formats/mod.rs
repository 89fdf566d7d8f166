//! One file per format. Shared pieces: bit packing and min-max quantization.

pub mod f16;
pub mod k1_5_mix;
pub mod kivi2;
pub mod minmax;
pub mod pack;
pub mod q1_calib;
pub mod q2_had;
pub mod q4_0;
pub mod q8_0;
pub mod v1_58_tern;
