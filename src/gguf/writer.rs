//! The GGUF writer: builds a v3 (or v2) file that [`super::Gguf::parse`] reads back identically.
//! Used by tests, by the built-in demo model and for KV-cache snapshots.

use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use super::error::GgufError;
use super::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, tensor_size};
use super::types::GgmlType;
use super::value::{MetaValue, ValueType};
use crate::Error;

/// A tensor's bytes, or only its size when they are all zero (written as a hole by
/// [`GgufWriter::write_file`]).
enum TensorData {
    Bytes(Vec<u8>),
    Zeros(u64),
}

struct PendingTensor {
    name: String,
    ty: &'static GgmlType,
    dims: Vec<u64>,
    data: TensorData,
}

impl PendingTensor {
    fn len(&self) -> u64 {
        match &self.data {
            TensorData::Bytes(b) => b.len() as u64,
            TensorData::Zeros(n) => *n,
        }
    }
}

/// Collects metadata and tensors, then writes them out in one pass.
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: vec![],
            tensors: vec![],
        }
    }
}

impl std::fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |t: &PendingTensor| t.name.clone();
        f.debug_struct("GgufWriter")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field(
                "keys",
                &self.metadata.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field(
                "tensors",
                &self.tensors.iter().map(names).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Runs of zeros at least this long become holes in [`GgufWriter::write_file`]; shorter ones
/// (alignment padding) are cheaper to write than to seek over.
const HOLE_MIN: u64 = 1 << 16;
static ZEROS: [u8; HOLE_MIN as usize] = [0; HOLE_MIN as usize];

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Write GGUF version 2 or 3 (the default); the two differ only in the version field.
    ///
    /// # Panics
    /// On any other version: a programming error, not a property of input data.
    pub fn version(mut self, version: u32) -> GgufWriter {
        assert!(
            version == 2 || version == 3,
            "GGUF writer supports versions 2 and 3"
        );
        self.version = version;
        self
    }

    /// Add one metadata entry. `general.alignment` also sets the data alignment.
    pub fn add(&mut self, key: &str, value: impl Into<MetaValue>) -> Result<&mut Self, GgufError> {
        let value = value.into();
        let bad = |problem: String| GgufError::Metadata {
            key: key.to_owned(),
            problem,
        };
        if self.metadata.iter().any(|(k, _)| k == key) {
            return Err(GgufError::DuplicateKey(key.to_owned()));
        }
        if let MetaValue::Array(elem, items) = &value {
            if *elem == ValueType::Array {
                return Err(GgufError::NestedArray(key.to_owned()));
            }
            if let Some(v) = items.iter().find(|v| v.value_type() != *elem) {
                return Err(bad(format!(
                    "array of {elem} holds a {} value",
                    v.value_type()
                )));
            }
        }
        if key == "general.alignment" {
            match value {
                MetaValue::U32(a) if a.is_power_of_two() => self.alignment = a.into(),
                _ => return Err(GgufError::BadAlignment(format!("{value:?}"))),
            }
        }
        self.metadata.push((key.to_owned(), value));
        Ok(self)
    }

    /// Add a tensor of type `ty` with dims `ne[0..]`; `data` must be exactly its size.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: &'static GgmlType,
        dims: &[u64],
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        self.push_tensor(name, ty, dims, Some(data))
    }

    /// Add a tensor of type `ty` with dims `ne[0..]` whose bytes are all zero. Nothing is
    /// allocated for it, and [`GgufWriter::write_file`] leaves it as a hole in a sparse file,
    /// so multi-GB test models cost neither memory nor disk.
    pub fn add_tensor_zeros(
        &mut self,
        name: &str,
        ty: &'static GgmlType,
        dims: &[u64],
    ) -> Result<&mut Self, GgufError> {
        self.push_tensor(name, ty, dims, None)
    }

    /// `data: None` for all zeros.
    fn push_tensor(
        &mut self,
        name: &str,
        ty: &'static GgmlType,
        dims: &[u64],
        data: Option<Vec<u8>>,
    ) -> Result<&mut Self, GgufError> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name.to_owned()));
        }
        let bytes = tensor_size(name, ty, dims)?;
        let data = match data {
            None => TensorData::Zeros(bytes),
            Some(data) if data.len() as u64 == bytes => TensorData::Bytes(data),
            Some(data) => {
                return Err(GgufError::Metadata {
                    key: name.to_owned(),
                    problem: format!(
                        "{} tensor of dims {dims:?} needs {bytes} bytes, got {}",
                        ty.name,
                        data.len()
                    ),
                });
            }
        };
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            ty,
            dims: dims.to_vec(),
            data,
        });
        Ok(self)
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        self.write_with(w, write_zeros).map(drop)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }

    /// Write the file; long runs of zeros (from [`GgufWriter::add_tensor_zeros`]) are skipped
    /// over and left as holes.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        let len = self
            .write_with(&mut file, |w, n| {
                if n < HOLE_MIN {
                    return write_zeros(w, n);
                }
                let pos = w.stream_position()?;
                let end = pos.checked_add(n).ok_or_else(too_large)?;
                w.seek(SeekFrom::Start(end)).map(drop)
            })
            .map_err(io)?;
        let file = file.into_inner().map_err(|e| io(e.into_error()))?;
        // A hole at the end is not part of the file until its length says so.
        file.set_len(len).map_err(io)
    }

    /// Write header and data; `zeros(w, n)` produces `n` zero bytes. Returns the bytes written.
    fn write_with<W: Write>(
        &self,
        w: &mut W,
        mut zeros: impl FnMut(&mut W, u64) -> io::Result<()>,
    ) -> io::Result<u64> {
        let mut header = Vec::new();
        header.extend_from_slice(GGUF_MAGIC);
        header.extend_from_slice(&self.version.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut header, key);
            header.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            t.dims
                .iter()
                .for_each(|d| header.extend_from_slice(&d.to_le_bytes()));
            header.extend_from_slice(&t.ty.id.to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = self.padded(offset.checked_add(t.len()))?;
        }
        w.write_all(&header)?;
        // Each tensor starts aligned; the file ends aligned too, as gguf-py and ggml write it.
        let mut written = header.len() as u64;
        for t in &self.tensors {
            let start = self.padded(Some(written))?;
            zeros(w, start - written)?;
            match &t.data {
                TensorData::Bytes(b) => w.write_all(b)?,
                TensorData::Zeros(n) => zeros(w, *n)?,
            }
            written = start.checked_add(t.len()).ok_or_else(too_large)?;
        }
        let end = self.padded(Some(written))?;
        zeros(w, end - written)?;
        Ok(end)
    }

    fn padded(&self, v: Option<u64>) -> io::Result<u64> {
        v.and_then(|v| v.checked_next_multiple_of(self.alignment))
            .ok_or_else(too_large)
    }
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "GGUF tensor data would exceed 2^64 bytes",
    )
}

fn write_zeros(w: &mut impl Write, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let step = n.min(HOLE_MIN);
        w.write_all(&ZEROS[..step as usize])?;
        n -= step;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(elem, items) => {
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|item| put_value(out, item));
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

macro_rules! meta_from {
    ($($t:ty => $v:ident),*) => {
        $(impl From<$t> for MetaValue {
            fn from(x: $t) -> Self {
                MetaValue::$v(x)
            }
        })*
    };
}
meta_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64);
