//! Little-endian f16 and bit-field packing shared by the formats.

use half::f16;

use crate::Error;

/// Append `v` as a little-endian f16.
#[inline]
pub fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Read the `i`-th little-endian f16 of `bytes` as f32.
#[inline]
pub fn get_f16(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// Round through f16, the precision every stored scale has.
#[inline]
pub fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// A parameter as stored (rounded through f16), or an error where it overflows f16: formats
/// whose transforms grow values (rFFT sums, Hadamard rotations) can overflow even on in-range
/// input.
#[inline]
pub fn stored_f16(v: f32) -> Result<f32, Error> {
    let r = round_f16(v);
    if r.is_finite() {
        Ok(r)
    } else {
        Err(Error::InvalidArgument(format!(
            "a transformed value ({v}) exceeds the f16 range of the format's scales"
        )))
    }
}

/// Pack `codes` of `bits` bits each (1, 2 or 4) little-end first: code `j` sits in byte
/// `j * bits / 8` at bit `(j * bits) % 8`. Appends `ceil(len * bits / 8)` bytes.
// Inlined so that `bits` is a constant and the whole bytes vectorise; one resize, not a
// capacity check per byte.
#[inline(always)]
pub fn pack_bits(codes: &[u8], bits: usize, out: &mut Vec<u8>) {
    debug_assert!(matches!(bits, 1 | 2 | 4));
    let chunks = codes.chunks_exact(8 / bits);
    let tail = chunks.remainder();
    let start = out.len();
    out.resize(start + chunks.len(), 0);
    for (o, c) in out[start..].iter_mut().zip(chunks) {
        *o = pack_byte(c, bits);
    }
    if !tail.is_empty() {
        out.push(pack_byte(tail, bits));
    }
}

/// One byte of [`pack_bits`]: `codes[k]` at bit `k * bits`.
#[inline(always)]
fn pack_byte(codes: &[u8], bits: usize) -> u8 {
    let mut byte = 0u8;
    for (k, &c) in codes.iter().enumerate() {
        byte |= c << (k * bits);
    }
    byte
}

/// Code `j` of a string packed by [`pack_bits`].
#[inline]
pub fn unpack_bits(packed: &[u8], bits: usize, j: usize) -> u8 {
    let per_byte = 8 / bits;
    (packed[j / per_byte] >> ((j % per_byte) * bits)) & ((1u8 << bits) - 1)
}

/// Bytes that `len` codes of `bits` bits take.
pub const fn packed_len(len: usize, bits: usize) -> usize {
    (len * bits).div_ceil(8)
}
