//! Row functions with ggml's type-trait signatures for the per-token formats, so that a ggml
//! fork can register them: `from_float` (`kvb_quantize_row_*`), `to_float`
//! (`kvb_dequantize_row_*`) and `vec_dot` (`kvb_vec_dot_*`).
//!
//! - `q8_0`, `q4_0`: ggml's own blocks (32 values in 34 / 18 bytes), byte for byte; the dot
//!   takes `y` as q8_0, ggml's `vec_dot_type` for both, and sums as ggml's reference does.
//! - `q2_had`: blocks of 128 values in 40 bytes, one AKVQ-VL token record of head dim 128
//!   (Walsh-Hadamard rotation, two 64-value groups of 2-bit min-max codes, no pivots);
//!   the dot takes `y` as f32.
//!
//! The `void` functions cannot report errors: on a bad argument they set `kvb_last_error`
//! and write zero codes, NaN values or a NaN dot. `kvb_quantize_row`, `kvb_dequantize_row`
//! and `kvb_vec_dot` take the type id first and return a status.

use std::ffi::{c_int, c_void};

use super::params::{KVB_TYPE_Q2_HAD, KVB_TYPE_Q4_0, KVB_TYPE_Q8_0};
use super::status::{Fail, KVB_ERR_UNSUPPORTED, arg_mut, guard, mul, slice, slice_mut};
use crate::kv::formats::pack::get_f16;
use crate::kv::{FormatId, QuantParams, Role, Shape};

/// How a row type maps onto its [`crate::kv::Format`].
#[derive(Clone, Copy)]
struct RowType {
    f: FormatId,
    /// ggml's `blck_size` and `type_size`.
    block: usize,
    bytes: usize,
    /// Values per format token: rows are quantized as tokens of this head dim.
    d: usize,
    /// Bytes before the first token of a format block (q2_had's pivot count), not in a row.
    header: usize,
}

const Q8_0: RowType = RowType {
    f: FormatId::Q8_0,
    block: 32,
    bytes: 34,
    d: 64,
    header: 0,
};
const Q4_0: RowType = RowType {
    f: FormatId::Q4_0,
    block: 32,
    bytes: 18,
    d: 64,
    header: 0,
};
const Q2_HAD: RowType = RowType {
    f: FormatId::Q2Had,
    block: 128,
    bytes: 40,
    d: 128,
    header: 4,
};

/// ggml type ids of the `vec_dot_type`s.
const GGML_TYPE_F32: i32 = 0;
const GGML_TYPE_Q8_0: i32 = 8;

/// What ggml's type traits need to know of a row type.
#[repr(C)]
pub struct kvb_row_traits {
    /// Values per block (ggml's `blck_size`): a row's length must be a multiple of it.
    pub blck_size: i64,
    /// Bytes per block (ggml's `type_size`).
    pub type_size: usize,
    /// ggml type id of `vec_dot`'s second operand (8 = GGML_TYPE_Q8_0, 0 = GGML_TYPE_F32).
    pub vec_dot_type: i32,
}

fn row_type(ty: i32) -> Result<RowType, Fail> {
    match ty {
        KVB_TYPE_Q8_0 => Ok(Q8_0),
        KVB_TYPE_Q4_0 => Ok(Q4_0),
        KVB_TYPE_Q2_HAD => Ok(Q2_HAD),
        _ => Err(Fail::new(
            KVB_ERR_UNSUPPORTED,
            format!(
                "type {ty} has no row functions: they exist for q8_0, q4_0 and q2_had, the \
                 formats that quantize each token on its own"
            ),
        )),
    }
}

impl RowType {
    fn shape(self, n: usize) -> Shape {
        Shape {
            n,
            d: self.d,
            role: Role::Key,
        }
    }

    /// Blocks in a row of `k` values, or why `k` is not a row.
    fn blocks(self, k: i64) -> Result<usize, Fail> {
        usize::try_from(k)
            .ok()
            .filter(|&k| k > 0 && k % self.block == 0)
            .map(|k| k / self.block)
            .ok_or_else(|| {
                Fail::invalid(format!(
                    "row of {k} values: {} rows hold a positive multiple of {} values",
                    self.f, self.block
                ))
            })
    }

    /// Quantizes `x` into `y` (`x.len() / block * bytes` bytes). Whole tokens go through the
    /// format; a tail shorter than a token is zero-padded to one and its bytes cut back, which
    /// is exact because blocks are independent.
    fn quantize(self, x: &[f32], y: &mut [u8]) -> Result<(), Fail> {
        let p = QuantParams::default();
        let full = x.len() / self.d * self.d;
        let mut buf = Vec::with_capacity(y.len() + self.header);
        if full > 0 {
            self.f
                .imp()
                .quantize(&x[..full], self.shape(full / self.d), &[], &p, &mut buf)?;
            buf.drain(..self.header);
        }
        if full < x.len() {
            let mut pad = x[full..].to_vec();
            pad.resize(self.d, 0.0);
            let at = buf.len();
            self.f
                .imp()
                .quantize(&pad, self.shape(1), &[], &p, &mut buf)?;
            buf.drain(at..at + self.header);
            buf.truncate(y.len());
        }
        y.copy_from_slice(&buf);
        Ok(())
    }

    /// Dequantizes `x` (`y.len() / block * bytes` bytes) into `y`, tail as in `quantize`.
    fn dequantize(self, x: &[u8], y: &mut [f32]) {
        let full = y.len() / self.d * self.d;
        let tok = self.bytes * self.d / self.block;
        let mut buf = vec![0u8; self.header];
        if full > 0 {
            buf.extend_from_slice(&x[..full / self.d * tok]);
            self.f
                .imp()
                .dequantize(&buf, self.shape(full / self.d), &mut y[..full]);
        }
        if full < y.len() {
            buf.truncate(self.header);
            buf.extend_from_slice(&x[full / self.d * tok..]);
            buf.resize(self.header + tok, 0);
            let mut out = vec![0f32; self.d];
            self.f.imp().dequantize(&buf, self.shape(1), &mut out);
            let rest = y.len() - full;
            y[full..].copy_from_slice(&out[..rest]);
        }
    }

    /// `x · y` over `n` values: `x` of this type, `y` of its `vec_dot_type`.
    fn vec_dot(self, n: usize, x: &[u8], y: &[u8]) -> f32 {
        match self.f {
            FormatId::Q8_0 => dot_q8_0(x, y),
            FormatId::Q4_0 => dot_q4_0(x, y),
            _ => self.dot_f32(n, x, y),
        }
    }

    /// `y_bytes` bytes of `vec_dot`'s second operand for `n` values.
    fn y_bytes(self, n: usize) -> usize {
        match self.f {
            FormatId::Q8_0 | FormatId::Q4_0 => n / Q8_0.block * Q8_0.bytes,
            _ => n * 4,
        }
    }

    /// Token by token through [`crate::kv::Format::scores`], `y` as little-endian f32.
    fn dot_f32(self, n: usize, x: &[u8], y: &[u8]) -> f32 {
        let tok = self.bytes * self.d / self.block;
        let mut block = vec![0u8; self.header + tok];
        let mut q = vec![0f32; self.d];
        let mut score = [0f32];
        let mut sum = 0f32;
        for t in 0..n / self.d {
            block[self.header..].copy_from_slice(&x[t * tok..][..tok]);
            let yt = &y[t * self.d * 4..][..self.d * 4];
            for (q, b) in q.iter_mut().zip(yt.chunks_exact(4)) {
                *q = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
            self.f.imp().scores(&block, self.shape(1), &q, &mut score);
            sum += score[0];
        }
        sum
    }
}

/// ggml's `ggml_vec_dot_q8_0_q8_0` reference: integer sums per block, scaled by both scales.
fn dot_q8_0(x: &[u8], y: &[u8]) -> f32 {
    let b = Q8_0.bytes;
    x.chunks_exact(b)
        .zip(y.chunks_exact(b))
        .fold(0f32, |sum, (xb, yb)| {
            let sumi: i32 = xb[2..]
                .iter()
                .zip(&yb[2..])
                .map(|(&a, &c)| a as i8 as i32 * c as i8 as i32)
                .sum();
            sum + sumi as f32 * (get_f16(xb, 0) * get_f16(yb, 0))
        })
}

/// ggml's `ggml_vec_dot_q4_0_q8_0` reference: low nibbles against the first half of the q8_0
/// block, high nibbles against the second.
fn dot_q4_0(x: &[u8], y: &[u8]) -> f32 {
    x.chunks_exact(Q4_0.bytes)
        .zip(y.chunks_exact(Q8_0.bytes))
        .fold(0f32, |sum, (xb, yb)| {
            let (lo, hi) = yb[2..].split_at(16);
            let sumi: i32 = xb[2..]
                .iter()
                .zip(lo.iter().zip(hi))
                .map(|(&q, (&a, &c))| {
                    ((q & 0x0F) as i32 - 8) * a as i8 as i32
                        + ((q >> 4) as i32 - 8) * c as i8 as i32
                })
                .sum();
            sum + sumi as f32 * get_f16(xb, 0) * get_f16(yb, 0)
        })
}

/// # Safety
/// `x`: `k` readable floats; `y`: the row's bytes, writable; both NULL-checked.
unsafe fn quantize_row(ty: i32, x: *const f32, y: *mut c_void, k: i64) -> Result<(), Fail> {
    let t = row_type(ty)?;
    let nb = t.blocks(k)?;
    // SAFETY: the caller's contract.
    let (x, y) = unsafe {
        (
            slice(x, nb * t.block, "x")?,
            slice_mut(y.cast::<u8>(), mul(nb, t.bytes, "row bytes")?, "y")?,
        )
    };
    let r = t.quantize(x, y);
    if r.is_err() {
        y.fill(0);
    }
    r
}

/// # Safety
/// `x`: the row's bytes; `y`: `k` writable floats; both NULL-checked.
unsafe fn dequantize_row(ty: i32, x: *const c_void, y: *mut f32, k: i64) -> Result<(), Fail> {
    let t = row_type(ty)?;
    let nb = t.blocks(k)?;
    // SAFETY: the caller's contract.
    let (x, y) = unsafe {
        (
            slice(x.cast::<u8>(), mul(nb, t.bytes, "row bytes")?, "x")?,
            slice_mut(y, nb * t.block, "y")?,
        )
    };
    t.dequantize(x, y);
    Ok(())
}

/// # Safety
/// `s`: one writable float; `x`, `y`: `n` values of their types; all NULL-checked.
unsafe fn vec_dot(
    ty: i32,
    n: c_int,
    s: *mut f32,
    x: *const c_void,
    y: *const c_void,
    nrc: c_int,
) -> Result<(), Fail> {
    // SAFETY: the caller's contract.
    let s = unsafe { arg_mut(s, "s") }?;
    *s = f32::NAN;
    let t = row_type(ty)?;
    if nrc != 1 {
        return Err(Fail::invalid(format!(
            "nrc = {nrc}: kvbits row types compute one dot at a time (register them with nrows = 1)"
        )));
    }
    let nb = t.blocks(n.into())?;
    let n = nb * t.block;
    // SAFETY: the caller's contract.
    let (x, y) = unsafe {
        (
            slice(x.cast::<u8>(), nb * t.bytes, "x")?,
            slice(y.cast::<u8>(), t.y_bytes(n), "y")?,
        )
    };
    *s = t.vec_dot(n, x, y);
    Ok(())
}

/// ggml type-trait facts of a row type (`KVB_TYPE_Q8_0`, `KVB_TYPE_Q4_0`, `KVB_TYPE_Q2_HAD`).
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_row_traits_get(ty: i32, out: *mut kvb_row_traits) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { arg_mut(out, "out") }?;
        let t = row_type(ty)?;
        *out = kvb_row_traits {
            blck_size: t.block as i64,
            type_size: t.bytes,
            vec_dot_type: match t.f {
                FormatId::Q2Had => GGML_TYPE_F32,
                _ => GGML_TYPE_Q8_0,
            },
        };
        Ok(())
    })
}

/// Quantizes a row of `k` floats (a multiple of the type's block) into `y`.
///
/// # Safety
/// `x` must be NULL or `k` readable floats; `y` NULL or the row's writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_quantize_row(ty: i32, x: *const f32, y: *mut c_void, k: i64) -> c_int {
    // SAFETY: the caller's contract.
    guard(|| unsafe { quantize_row(ty, x, y, k) })
}

/// Dequantizes a row of `k` values from `x` into `y`.
///
/// # Safety
/// `x` must be NULL or the row's readable bytes; `y` NULL or `k` writable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_dequantize_row(
    ty: i32,
    x: *const c_void,
    y: *mut f32,
    k: i64,
) -> c_int {
    // SAFETY: the caller's contract.
    guard(|| unsafe { dequantize_row(ty, x, y, k) })
}

/// `*s = x · y` over `n` values, `x` of type `ty` and `y` of its `vec_dot_type`; `bs`, `bx`
/// and `by` are unused (as in ggml when `nrc` is 1, the only count supported).
///
/// # Safety
/// `s` must be NULL or writable; `x` and `y` NULL or `n` values of their types.
#[allow(clippy::too_many_arguments)] // ggml's vec_dot and the type
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_vec_dot(
    ty: i32,
    n: c_int,
    s: *mut f32,
    bs: usize,
    x: *const c_void,
    bx: usize,
    y: *const c_void,
    by: usize,
    nrc: c_int,
) -> c_int {
    let _ = (bs, bx, by);
    // SAFETY: the caller's contract.
    guard(|| unsafe { vec_dot(ty, n, s, x, y, nrc) })
}

/// The NaN fill of a failed `to_float`: `k` floats at `y`, when both are usable.
///
/// # Safety
/// A non-NULL `y` must hold `k` writable floats.
unsafe fn fill_nan(y: *mut f32, k: i64) {
    if let Ok(k) = usize::try_from(k) {
        // SAFETY: the caller's contract; `slice_mut` refuses NULL and oversized rows.
        if let Ok(y) = unsafe { slice_mut(y, k, "y") } {
            y.fill(f32::NAN);
        }
    }
}

// The `void` functions ggml's type traits take, one set per row type (written out, not made by
// a macro, so that cbindgen sees them). On error: `kvb_last_error`, and zero codes, NaN values
// or a NaN dot.

/// ggml `from_float` for q8_0.
///
/// # Safety
/// As `kvb_quantize_row`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_quantize_row_q8_0(x: *const f32, y: *mut c_void, k: i64) {
    // SAFETY: the caller's contract.
    unsafe { kvb_quantize_row(KVB_TYPE_Q8_0, x, y, k) };
}

/// ggml `to_float` for q8_0.
///
/// # Safety
/// As `kvb_dequantize_row`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_dequantize_row_q8_0(x: *const c_void, y: *mut f32, k: i64) {
    // SAFETY: the caller's contract.
    if unsafe { kvb_dequantize_row(KVB_TYPE_Q8_0, x, y, k) } != 0 {
        unsafe { fill_nan(y, k) }
    }
}

/// ggml `vec_dot` for q8_0 (`y` q8_0).
///
/// # Safety
/// As `kvb_vec_dot`.
#[allow(clippy::too_many_arguments)] // ggml's signature
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_vec_dot_q8_0(
    n: c_int,
    s: *mut f32,
    bs: usize,
    x: *const c_void,
    bx: usize,
    y: *const c_void,
    by: usize,
    nrc: c_int,
) {
    // SAFETY: the caller's contract.
    unsafe { kvb_vec_dot(KVB_TYPE_Q8_0, n, s, bs, x, bx, y, by, nrc) };
}

/// ggml `from_float` for q4_0.
///
/// # Safety
/// As `kvb_quantize_row`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_quantize_row_q4_0(x: *const f32, y: *mut c_void, k: i64) {
    // SAFETY: the caller's contract.
    unsafe { kvb_quantize_row(KVB_TYPE_Q4_0, x, y, k) };
}

/// ggml `to_float` for q4_0.
///
/// # Safety
/// As `kvb_dequantize_row`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_dequantize_row_q4_0(x: *const c_void, y: *mut f32, k: i64) {
    // SAFETY: the caller's contract.
    if unsafe { kvb_dequantize_row(KVB_TYPE_Q4_0, x, y, k) } != 0 {
        unsafe { fill_nan(y, k) }
    }
}

/// ggml `vec_dot` for q4_0 (`y` q8_0).
///
/// # Safety
/// As `kvb_vec_dot`.
#[allow(clippy::too_many_arguments)] // ggml's signature
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_vec_dot_q4_0(
    n: c_int,
    s: *mut f32,
    bs: usize,
    x: *const c_void,
    bx: usize,
    y: *const c_void,
    by: usize,
    nrc: c_int,
) {
    // SAFETY: the caller's contract.
    unsafe { kvb_vec_dot(KVB_TYPE_Q4_0, n, s, bs, x, bx, y, by, nrc) };
}

/// ggml `from_float` for q2_had.
///
/// # Safety
/// As `kvb_quantize_row`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_quantize_row_q2_had(x: *const f32, y: *mut c_void, k: i64) {
    // SAFETY: the caller's contract.
    unsafe { kvb_quantize_row(KVB_TYPE_Q2_HAD, x, y, k) };
}

/// ggml `to_float` for q2_had.
///
/// # Safety
/// As `kvb_dequantize_row`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_dequantize_row_q2_had(x: *const c_void, y: *mut f32, k: i64) {
    // SAFETY: the caller's contract.
    if unsafe { kvb_dequantize_row(KVB_TYPE_Q2_HAD, x, y, k) } != 0 {
        unsafe { fill_nan(y, k) }
    }
}

/// ggml `vec_dot` for q2_had (`y` f32).
///
/// # Safety
/// As `kvb_vec_dot`.
#[allow(clippy::too_many_arguments)] // ggml's signature
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvb_vec_dot_q2_had(
    n: c_int,
    s: *mut f32,
    bs: usize,
    x: *const c_void,
    bx: usize,
    y: *const c_void,
    by: usize,
    nrc: c_int,
) {
    // SAFETY: the caller's contract.
    unsafe { kvb_vec_dot(KVB_TYPE_Q2_HAD, n, s, bs, x, bx, y, by, nrc) };
}
