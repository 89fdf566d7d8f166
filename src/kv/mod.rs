//! Quantized KV caches: the formats, one file each under `formats/`, listed in one table.

pub mod cache;
pub mod format;
pub mod formats;
pub mod simd;

pub use cache::{Block, BlockTokens, CacheConfig, KvCache, MemoryReport, Modality, Rows};
pub use format::{
    Applies, BlockSize, Format, FormatId, FormatInfo, HEAD_DIMS, QuantParams, Role, Shape,
};

use formats::*;

/// Every format, indexed by [`FormatId`]: the one place a newcomer looks a format up.
pub static FORMATS: [FormatInfo; 9] = [
    FormatInfo {
        id: FormatId::F16,
        name: "f16",
        applies: Applies::Both,
        summary: "half precision, the reference cache",
        imp: &f16::F16,
    },
    FormatInfo {
        id: FormatId::Q8_0,
        name: "q8_0",
        applies: Applies::Both,
        summary: "llama.cpp q8_0: per 32 values an f16 scale and int8 codes",
        imp: &q8_0::Q8_0,
    },
    FormatInfo {
        id: FormatId::Q4_0,
        name: "q4_0",
        applies: Applies::Both,
        summary: "llama.cpp q4_0: per 32 values an f16 scale and 4-bit codes",
        imp: &q4_0::Q4_0,
    },
    FormatInfo {
        id: FormatId::Kivi2,
        name: "kivi2",
        applies: Applies::Both,
        summary: "KIVI 2-bit: keys per channel, values per token, groups of 32",
        imp: &kivi2::Kivi2,
    },
    FormatInfo {
        id: FormatId::Q1Calib,
        name: "q1_calib",
        applies: Applies::Both,
        summary: "CalibQuant 1-bit: per-channel shrunk range, post-scaled scores",
        imp: &q1_calib::Q1Calib,
    },
    FormatInfo {
        id: FormatId::K1_5Mix,
        name: "k1_5_mix",
        applies: Applies::Keys,
        summary: "VidKV key: widest channels 2-bit, the rest 1-bit on rFFT coefficients",
        imp: &k1_5_mix::K1_5Mix,
    },
    FormatInfo {
        id: FormatId::V1_58Tern,
        name: "v1_58_tern",
        applies: Applies::Values,
        summary: "VidKV value: ternary per channel, salient tokens 2-bit",
        imp: &v1_58_tern::V1_58Tern,
    },
    FormatInfo {
        id: FormatId::Q2Had,
        name: "q2_had",
        applies: Applies::Both,
        summary: "AKVQ-VL: Walsh-Hadamard rotation, 2-bit per token, pivots f16",
        imp: &q2_had::Q2Had,
    },
    FormatInfo {
        id: FormatId::Q4Had,
        name: "q4_had",
        applies: Applies::Both,
        summary: "AKVQ-VL text tokens: Walsh-Hadamard rotation, 4-bit per token",
        imp: &q2_had::Q4Had,
    },
];
