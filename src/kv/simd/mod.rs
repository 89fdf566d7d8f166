//! Fast CPU paths: SIMD kernels that score and sum straight from the packed codes, serving
//! every query head of a KV head from one read of a block, and quantizers that write the
//! reference's bytes faster.
//!
//! The scalar formats in `formats/` stay the ground truth. A format's fast kernels live in the
//! file of the same name here (`simd/q1_calib.rs` beside `formats/q1_calib.rs`); shared pieces
//! are `lanes.rs` (the packed-code kernels of the 2-bit and ternary formats, written once
//! for AVX2 and AVX-512), `rows.rs` (kernels that decode a token into a row every head
//! reads: q8_0, q4_0), `softmax.rs` (vector exp) and `f16.rs` (F16C). [`kernel`] and [`quantize`] are the dispatch points;
//! [`isa`] picks the instruction set once per process: the best the CPU has, or what
//! `KVBITS_CPU=scalar|avx2|avx512` forces. `scalar` is the portable path: the reference
//! kernels one query head at a time ([`PerHead`]), still threaded by the cache.
//!
//! Decode attention itself (threads over KV heads and chunks of tokens, merged in a fixed
//! order) is in `cache/attend.rs`.

/// Calls `$f::<H>(args)` with `H = $nh` (1..=7; more is 7): kernels keep a register per head,
/// which needs the count at compile time.
macro_rules! by_heads {
    ($nh:expr, $f:ident::<$v:ty>($($a:expr),*)) => {
        match $nh {
            1 => $f::<$v, 1>($($a),*),
            2 => $f::<$v, 2>($($a),*),
            3 => $f::<$v, 3>($($a),*),
            4 => $f::<$v, 4>($($a),*),
            5 => $f::<$v, 5>($($a),*),
            6 => $f::<$v, 6>($($a),*),
            _ => $f::<$v, 7>($($a),*),
        }
    };
    ($nh:expr, $f:ident($($a:expr),*)) => {
        match $nh {
            1 => $f::<1>($($a),*),
            2 => $f::<2>($($a),*),
            3 => $f::<3>($($a),*),
            4 => $f::<4>($($a),*),
            5 => $f::<5>($($a),*),
            6 => $f::<6>($($a),*),
            _ => $f::<7>($($a),*),
        }
    };
}

pub mod bench;
pub mod f16;
#[cfg(target_arch = "x86_64")]
pub mod k1_5_mix;
#[cfg(target_arch = "x86_64")]
pub mod kivi2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod lanes;
#[cfg(target_arch = "x86_64")]
pub mod q1_calib;
#[cfg(target_arch = "x86_64")]
pub mod q2_had;
#[cfg(target_arch = "x86_64")]
pub mod q4_0;
#[cfg(target_arch = "x86_64")]
pub mod q8_0;
#[cfg(target_arch = "x86_64")]
pub(crate) mod rows;
pub mod softmax;
#[cfg(target_arch = "x86_64")]
pub mod v1_58_tern;

use std::marker::PhantomData;
use std::sync::OnceLock;

use crate::Error;
use crate::kv::{FormatId, QuantParams, Shape};

/// An instruction set the fast paths are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable: the reference kernels, one query head at a time.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F and BW, on top of AVX2.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn from_name(name: &str) -> Result<Isa, Error> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name() == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown CPU path '{name}'; known: scalar, avx2, avx512"
                ))
            })
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::Avx512 => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// The best path this CPU runs.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.supported())
            .unwrap_or(Isa::Scalar)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The path this process uses, chosen on first call: `KVBITS_CPU` if set (a path this CPU
/// lacks, or a name not known, falls back to the best one with a warning), else the best.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let Ok(want) = std::env::var("KVBITS_CPU") else {
            return Isa::best();
        };
        match Isa::from_name(want.trim()) {
            Ok(i) if i.supported() => i,
            Ok(i) => {
                eprintln!(
                    "kvbits: KVBITS_CPU={i}: this CPU lacks it, using {}",
                    Isa::best()
                );
                Isa::best()
            }
            Err(e) => {
                eprintln!("kvbits: KVBITS_CPU: {e}; using {}", Isa::best());
                Isa::best()
            }
        }
    })
}

/// Decode-attention kernels of one format for all the query heads of one KV head.
///
/// Rows are strided: head `h`'s values for token `t` are at `h * stride + t`, so that one
/// buffer can hold a chunk of several blocks. The number of heads is `q.len() / d`
/// (`out.len() / d` for [`Kernel::accumulate`]).
pub trait Kernel: Sync {
    /// `out[h * stride + t] = q_h · x̂_t` for the block's tokens.
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize);

    /// `out[h * d + c] += Σ_t p[h * stride + t] · x̂_t[c]`.
    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]);
}

/// A format's reference kernels run once per query head: the portable path, and the path of
/// every format without a file here.
pub struct PerHead(pub FormatId);

impl Kernel for PerHead {
    fn scores(&self, block: &[u8], shape: Shape, q: &[f32], out: &mut [f32], stride: usize) {
        let f = self.0.imp();
        for (h, qh) in q.chunks_exact(shape.d).enumerate() {
            f.scores(block, shape, qh, &mut out[h * stride..][..shape.n]);
        }
    }

    fn accumulate(&self, block: &[u8], shape: Shape, p: &[f32], stride: usize, out: &mut [f32]) {
        let f = self.0.imp();
        for (h, oh) in out.chunks_exact_mut(shape.d).enumerate() {
            f.accumulate(block, shape, &p[h * stride..][..shape.n], oh);
        }
    }
}

static PER_HEAD: [PerHead; 9] = [
    PerHead(FormatId::F16),
    PerHead(FormatId::Q8_0),
    PerHead(FormatId::Q4_0),
    PerHead(FormatId::Kivi2),
    PerHead(FormatId::Q1Calib),
    PerHead(FormatId::K1_5Mix),
    PerHead(FormatId::V1_58Tern),
    PerHead(FormatId::Q2Had),
    PerHead(FormatId::Q4Had),
];

/// The kernels of format `id` on path `isa` (which the caller has checked is supported).
/// Every format has an AVX2 kernel; q1_calib and the formats of `lanes` an AVX-512 one
/// besides, the others run their AVX2 kernel on AVX-512 machines.
pub fn kernel(id: FormatId, isa: Isa) -> &'static dyn Kernel {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        use lanes::{Avx2, Avx512};
        let wide = isa == Isa::Avx512;
        return match id {
            FormatId::F16 => &f16::F16Avx2,
            FormatId::Q8_0 => &q8_0::Q8_0_AVX2,
            FormatId::Q4_0 => &q4_0::Q4_0_AVX2,
            FormatId::Kivi2 if wide => &kivi2::Kivi2Fast::<Avx512>(PhantomData),
            FormatId::Kivi2 => &kivi2::Kivi2Fast::<Avx2>(PhantomData),
            FormatId::Q1Calib if wide => &q1_calib::Q1CalibAvx512,
            FormatId::Q1Calib => &q1_calib::Q1CalibAvx2,
            FormatId::K1_5Mix if wide => &k1_5_mix::K1_5MixFast::<Avx512>(PhantomData),
            FormatId::K1_5Mix => &k1_5_mix::K1_5MixFast::<Avx2>(PhantomData),
            FormatId::V1_58Tern if wide => &v1_58_tern::V1_58TernFast::<Avx512>(PhantomData),
            FormatId::V1_58Tern => &v1_58_tern::V1_58TernFast::<Avx2>(PhantomData),
            FormatId::Q2Had if wide => &q2_had::HadFast::<Avx512, 2>(PhantomData),
            FormatId::Q2Had => &q2_had::HadFast::<Avx2, 2>(PhantomData),
            FormatId::Q4Had if wide => &q2_had::HadFast::<Avx512, 4>(PhantomData),
            FormatId::Q4Had => &q2_had::HadFast::<Avx2, 4>(PhantomData),
        };
    }
    let _ = isa;
    &PER_HEAD[id as usize]
}

/// [`Format::quantize`](crate::kv::Format::quantize) of format `id` on this process's path:
/// the same bytes as the reference, faster where a format has a fast quantizer.
pub fn quantize(
    id: FormatId,
    x: &[f32],
    shape: Shape,
    protect: &[bool],
    params: &QuantParams,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    match id {
        FormatId::F16 => {
            crate::kv::format::check_input(x, shape, protect)?;
            f16::f32s_to_f16(x, out);
            Ok(())
        }
        #[cfg(target_arch = "x86_64")]
        _ if isa() >= Isa::Avx2 => {
            // SAFETY: `isa()` only returns a path this CPU supports.
            unsafe { avx2::quantize(id, x, shape, protect, params, out) }
        }
        _ => id.imp().quantize(x, shape, protect, params, out),
    }
}

/// The reference quantizers, their source inlined (`#[inline(always)]` in `formats/`) into
/// functions compiled for AVX2, FMA and F16C: the compiler vectorises them and rounds without
/// a libm call. IEEE arithmetic without contraction, the same operations in the same order:
/// the same bytes, which `tests/cpu_fast.rs` checks.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::Error;
    use crate::kv::formats::{k1_5_mix, kivi2, q1_calib, q2_had, q4_0, q8_0, v1_58_tern};
    use crate::kv::{Format, FormatId, QuantParams, Shape};

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn quantize(
        id: FormatId,
        x: &[f32],
        shape: Shape,
        protect: &[bool],
        params: &QuantParams,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        match id {
            FormatId::Q8_0 => q8_0::Q8_0.quantize(x, shape, protect, params, out),
            FormatId::Q4_0 => q4_0::Q4_0.quantize(x, shape, protect, params, out),
            FormatId::Kivi2 => kivi2::Kivi2.quantize(x, shape, protect, params, out),
            FormatId::Q1Calib => q1_calib::Q1Calib.quantize(x, shape, protect, params, out),
            FormatId::K1_5Mix => k1_5_mix::K1_5Mix.quantize(x, shape, protect, params, out),
            FormatId::V1_58Tern => v1_58_tern::V1_58Tern.quantize(x, shape, protect, params, out),
            FormatId::Q2Had => q2_had::Q2Had.quantize(x, shape, protect, params, out),
            FormatId::Q4Had => q2_had::Q4Had.quantize(x, shape, protect, params, out),
            FormatId::F16 => id.imp().quantize(x, shape, protect, params, out),
        }
    }
}

/// Lanes of the portable reductions below: written over fixed arrays so that the compiler
/// turns them into vector code on any target.
const LANES: usize = 16;

/// `Σ a_i·b_i`, in `LANES` interleaved partial sums.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a_i`, in `LANES` interleaved partial sums.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let c = a.chunks_exact(LANES);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        for i in 0..LANES {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
