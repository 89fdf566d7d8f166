//! The GGUF reader: parses the header of a mapped file and borrows everything from the map.
//!
//! Parsing touches only the header pages; tensor data is handed out as slices of the map and
//! never read here, so opening a multi-GB model costs what its metadata costs.
//! Every length is checked against what is left of the file before anything is allocated, so
//! hostile input can neither panic nor make the reader allocate more than the file's size.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::GgufError;
use super::types::GgmlType;
use super::value::{Array, Value, ValueType};
use crate::Error;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted: the spec stores it as a u32.
pub const MAX_ALIGNMENT: u64 = 1 << 31;
/// GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;

/// A GGUF file mapped into memory. [`GgufFile::parse`] gives the borrowed view.
pub struct GgufFile {
    path: PathBuf,
    map: Option<Mmap>,
}

impl GgufFile {
    /// Map `path` read-only. Nothing is read yet.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, Error> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // A zero-length map is an error on some systems; an empty file is simply truncated.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only; as with every mmap-based loader, a file truncated
            // by another process while mapped is outside what we can guard against.
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        Ok(GgufFile { path, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Parse and validate the header; errors name the file.
    pub fn parse(&self) -> Result<Gguf<'_>, Error> {
        Gguf::parse(self.bytes()).map_err(|e| e.in_file(&self.path).into())
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo<'a> {
    pub name: &'a str,
    /// ne[0..n_dims], ne[0] the fastest-varying.
    pub dims: Vec<u64>,
    pub ty: &'static GgmlType,
    /// Offset into the data section.
    pub offset: u64,
    /// Bytes of data, from the type table.
    pub bytes: u64,
}

impl TensorInfo<'_> {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file, borrowing from its bytes.
#[derive(Debug)]
pub struct Gguf<'a> {
    pub version: u32,
    pub alignment: u64,
    /// Offset of the data section from the start of the file.
    pub data_offset: u64,
    metadata: Vec<(&'a str, Value<'a>)>,
    index: HashMap<&'a str, usize>,
    tensors: Vec<TensorInfo<'a>>,
    bytes: &'a [u8],
}

impl<'a> Gguf<'a> {
    /// Parse and validate a whole GGUF file held in `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Gguf<'a>, GgufError> {
        let mut c = Cursor { bytes, pos: 0 };
        let magic = c.take(4, || "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic.try_into().unwrap_or([0; 4])));
        }
        let version = c.u32(|| "version".into())?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.u64(|| "tensor count".into())?;
        let n_kv = c.u64(|| "metadata count".into())?;

        // Smallest key-value: key length (8) + empty key + type (4) + one-byte value.
        let mut metadata: Vec<(&str, Value<'_>)> = Vec::with_capacity(reserve_for(
            n_kv,
            c.left(),
            13,
            size_of::<(&str, Value<'_>)>(),
        ));
        let mut index = HashMap::with_capacity(reserve_for(n_kv, c.left(), 13, HASH_ENTRY_BYTES));
        for i in 0..n_kv {
            let key = c.string(|| format!("key of metadata entry {i}"))?;
            let key = std::str::from_utf8(key)
                .map_err(|_| GgufError::BadString(format!("key of metadata entry {i}")))?;
            let ty = c.u32(|| format!("type of '{key}'"))?;
            let ty = ValueType::from_id(ty).ok_or_else(|| GgufError::UnknownValueType {
                item: format!("'{key}'"),
                id: ty,
            })?;
            let value = c.value(ty, key)?;
            if index.insert(key, metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key.to_owned()));
            }
            metadata.push((key, value));
        }

        let alignment = match index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let v = metadata[i].1;
                match v.as_int() {
                    Some(a)
                        if a > 0 && a <= MAX_ALIGNMENT as i128 && (a as u128).is_power_of_two() =>
                    {
                        a as u64
                    }
                    _ => return Err(GgufError::BadAlignment(v.to_string())),
                }
            }
        };

        // Smallest tensor info: name length (8) + empty name + n_dims (4) + no dims + type (4)
        // + offset (8).
        let mut tensors: Vec<TensorInfo<'_>> = Vec::with_capacity(reserve_for(
            n_tensors,
            c.left(),
            24,
            size_of::<TensorInfo<'_>>(),
        ));
        let mut names =
            HashMap::with_capacity(reserve_for(n_tensors, c.left(), 24, HASH_ENTRY_BYTES));
        for i in 0..n_tensors {
            let info = c.tensor_info(i)?;
            if names.insert(info.name, i).is_some() {
                return Err(GgufError::DuplicateTensor(info.name.to_owned()));
            }
            tensors.push(info);
        }

        let data_offset = align_up(c.pos as u64, alignment).ok_or(GgufError::Truncated {
            item: "data section".into(),
            need: u64::MAX,
            have: bytes.len() as u64,
        })?;
        // Even empty tensors point into the data section, so it must begin inside the file.
        if !tensors.is_empty() && data_offset > bytes.len() as u64 {
            return Err(GgufError::Truncated {
                item: "padding before the tensor data".into(),
                need: data_offset - c.pos as u64,
                have: c.left() as u64,
            });
        }
        check_tensor_layout(&tensors, alignment, data_offset, bytes.len() as u64)?;
        Ok(Gguf {
            version,
            alignment,
            data_offset,
            metadata,
            index,
            tensors,
            bytes,
        })
    }

    /// Every metadata entry in file order.
    pub fn metadata(&self) -> &[(&'a str, Value<'a>)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.index.get(key).map(|&i| self.metadata[i].1)
    }

    pub fn tensors(&self) -> &[TensorInfo<'a>] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's bytes, borrowed from the map (bounds were checked at parse time).
    ///
    /// # Panics
    /// If `info` does not come from this file and lies outside it.
    pub fn tensor_data(&self, info: &TensorInfo<'_>) -> &'a [u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.bytes[start..start + info.bytes as usize]
    }
}

/// Bytes a hash map may take per reserved entry: hashbrown rounds capacity × 8/7 up to a power
/// of two, so a (&str, usize) entry plus its control byte costs at most ~57 bytes.
const HASH_ENTRY_BYTES: usize = 64;

/// How many entries to reserve for `count` items read from `left` bytes, each at least
/// `min_disk` bytes on disk and `in_memory` bytes once parsed: never more than the rest of the
/// file could hold, and never more memory than the rest of the file takes, whatever a hostile
/// count says. Files with more entries than that grow the containers as entries are read.
fn reserve_for(count: u64, left: usize, min_disk: usize, in_memory: usize) -> usize {
    count.min((left / min_disk.max(in_memory)) as u64) as usize
}

fn align_up(v: u64, alignment: u64) -> Option<u64> {
    Some(v.checked_add(alignment - 1)? & !(alignment - 1))
}

fn check_tensor_layout(
    tensors: &[TensorInfo<'_>],
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<(), GgufError> {
    let data_len = file_len.saturating_sub(data_offset);
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::Misaligned {
                tensor: t.name.to_owned(),
                offset: t.offset,
                alignment,
            });
        }
        let end = t.offset.checked_add(t.bytes);
        if end.is_none_or(|end| end > data_len) {
            return Err(GgufError::TensorOutOfBounds {
                tensor: t.name.to_owned(),
                offset: t.offset,
                bytes: t.bytes,
                data_len,
            });
        }
    }
    // Empty tensors hold no bytes, so they overlap nothing (gguf-py gives them the next
    // tensor's offset).
    let mut by_offset: Vec<&TensorInfo<'_>> = tensors.iter().filter(|t| t.bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if pair[0].offset + pair[0].bytes > pair[1].offset {
            return Err(GgufError::Overlap(
                pair[0].name.to_owned(),
                pair[1].name.to_owned(),
            ));
        }
    }
    Ok(())
}

/// Decode one scalar or string of type `ty` at the start of `bytes`: the value and the bytes
/// it took, or `None` when `bytes` is too short (or `ty` is an array).
pub(crate) fn decode_scalar_or_string(ty: ValueType, bytes: &[u8]) -> Option<(Value<'_>, usize)> {
    fn arr<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
        b.get(..N)?.try_into().ok()
    }
    Some(match ty {
        ValueType::U8 => (Value::U8(*bytes.first()?), 1),
        ValueType::I8 => (Value::I8(*bytes.first()? as i8), 1),
        ValueType::Bool => match *bytes.first()? {
            0 => (Value::Bool(false), 1),
            1 => (Value::Bool(true), 1),
            _ => return None,
        },
        ValueType::U16 => (Value::U16(u16::from_le_bytes(arr(bytes)?)), 2),
        ValueType::I16 => (Value::I16(i16::from_le_bytes(arr(bytes)?)), 2),
        ValueType::U32 => (Value::U32(u32::from_le_bytes(arr(bytes)?)), 4),
        ValueType::I32 => (Value::I32(i32::from_le_bytes(arr(bytes)?)), 4),
        ValueType::F32 => (Value::F32(f32::from_le_bytes(arr(bytes)?)), 4),
        ValueType::U64 => (Value::U64(u64::from_le_bytes(arr(bytes)?)), 8),
        ValueType::I64 => (Value::I64(i64::from_le_bytes(arr(bytes)?)), 8),
        ValueType::F64 => (Value::F64(f64::from_le_bytes(arr(bytes)?)), 8),
        ValueType::String => {
            let len = u64::from_le_bytes(arr(bytes)?);
            let end = usize::try_from(len).ok()?.checked_add(8)?;
            (Value::String(bytes.get(8..end)?), end)
        }
        ValueType::Array => return None,
    })
}

/// A read position over the file; every read is bounds-checked and names what it reads.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, item: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.left() as u64 {
            return Err(GgufError::Truncated {
                item: item(),
                need: n,
                have: self.left() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u32(&mut self, item: impl FnOnce() -> String) -> Result<u32, GgufError> {
        let b = self.take(4, item)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, item: impl FnOnce() -> String) -> Result<u64, GgufError> {
        let b = self.take(8, item)?;
        Ok(u64::from_le_bytes(b.try_into().expect("took 8 bytes")))
    }

    fn string(&mut self, item: impl Fn() -> String) -> Result<&'a [u8], GgufError> {
        let len = self.u64(&item)?;
        self.take(len, item)
    }

    fn value(&mut self, ty: ValueType, key: &str) -> Result<Value<'a>, GgufError> {
        if ty != ValueType::Array {
            let start = self.pos;
            let (v, used) = decode_scalar_or_string(ty, &self.bytes[start..])
                .ok_or_else(|| self.scalar_error(ty, format!("value of '{key}'")))?;
            self.pos += used;
            return Ok(v);
        }
        let elem = self.u32(|| format!("element type of array '{key}'"))?;
        let elem = ValueType::from_id(elem).ok_or_else(|| GgufError::UnknownValueType {
            item: format!("elements of array '{key}'"),
            id: elem,
        })?;
        if elem == ValueType::Array {
            return Err(GgufError::NestedArray(key.to_owned()));
        }
        let len = self.u64(|| format!("length of array '{key}'"))?;
        // Every element takes at least one byte (eight for a string's length): reject a length
        // the rest of the file cannot hold before walking it.
        let min_elem = elem.scalar_size().unwrap_or(8) as u64;
        if len.saturating_mul(min_elem) > self.left() as u64 {
            return Err(GgufError::Truncated {
                item: format!("array '{key}' of {len} {elem} values"),
                need: len.saturating_mul(min_elem),
                have: self.left() as u64,
            });
        }
        let start = self.pos;
        match elem.scalar_size() {
            // Fixed-size elements: one bounds check for the whole body (checked above).
            Some(size) => {
                let body = self.take(len * size as u64, || format!("array '{key}'"))?;
                if elem == ValueType::Bool
                    && let Some(i) = body.iter().position(|&b| b > 1)
                {
                    return Err(GgufError::BadBool {
                        item: format!("element {i} of array '{key}'"),
                        byte: body[i],
                    });
                }
            }
            None => {
                for i in 0..len {
                    self.string(|| format!("element {i} of array '{key}'"))?;
                }
            }
        }
        Ok(Value::Array(Array {
            elem,
            len: len as usize,
            body: &self.bytes[start..self.pos],
        }))
    }

    /// Why a scalar or string could not be decoded at the cursor.
    fn scalar_error(&self, ty: ValueType, item: String) -> GgufError {
        let rest = &self.bytes[self.pos..];
        match (ty, rest.first()) {
            (ValueType::Bool, Some(&b)) => GgufError::BadBool { item, byte: b },
            (ValueType::String, _) if rest.len() >= 8 => GgufError::Truncated {
                item,
                need: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                have: rest.len() as u64 - 8,
            },
            _ => GgufError::Truncated {
                item,
                need: ty.scalar_size().unwrap_or(8) as u64,
                have: rest.len() as u64,
            },
        }
    }

    fn tensor_info(&mut self, i: u64) -> Result<TensorInfo<'a>, GgufError> {
        let name = self.string(|| format!("name of tensor {i}"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| GgufError::BadString(format!("name of tensor {i}")))?;
        let n_dims = self.u32(|| format!("dimension count of tensor '{name}'"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name.to_owned(),
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(|| format!("dimension {d} of tensor '{name}'"))?);
        }
        let type_id = self.u32(|| format!("type of tensor '{name}'"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.to_owned(),
            id: type_id,
        })?;
        let offset = self.u64(|| format!("data offset of tensor '{name}'"))?;
        let bytes = tensor_size(name, ty, &dims)?;
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
            bytes,
        })
    }
}

/// Bytes of tensor `name` of type `ty` with dims `ne[0..]`, checked the way ggml checks them:
/// at most four dims, each dim and every partial product within int64_t (ggml's `ne` type),
/// whole blocks per row, and a byte count that fits in a u64.
pub(crate) fn tensor_size(name: &str, ty: &GgmlType, dims: &[u64]) -> Result<u64, GgufError> {
    if dims.len() > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            tensor: name.to_owned(),
            n_dims: dims.len() as u32,
        });
    }
    if ty.is_retired() {
        return Err(GgufError::RetiredTensorType {
            tensor: name.to_owned(),
            ty: ty.name,
        });
    }
    let overflow = || GgufError::DimsOverflow {
        tensor: name.to_owned(),
        dims: dims.to_vec(),
    };
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| {
            acc.checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64 && d <= i64::MAX as u64)
        })
        .ok_or_else(overflow)?;
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % ty.block != 0 {
        return Err(GgufError::PartialBlock {
            tensor: name.to_owned(),
            ne0,
            ty: ty.name,
            block: ty.block,
        });
    }
    ty.tensor_bytes(ne0, n_elements).ok_or_else(overflow)
}
