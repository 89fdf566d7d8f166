//! The GGUF writer: builds a v3 (or v2) file that [`super::Gguf::parse`] reads back identically.
//! Used by tests, by the built-in demo model and for KV-cache snapshots.

use std::io::{self, Write};
use std::path::Path;

use super::error::GgufError;
use super::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use super::types::GgmlType;
use super::value::{MetaValue, ValueType};
use crate::Error;

struct PendingTensor {
    name: String,
    ty: &'static GgmlType,
    dims: Vec<u64>,
    data: Vec<u8>,
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

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Write GGUF version 2 or 3 (the default); the two differ only in the version field.
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
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name.to_owned()));
        }
        if dims.len() > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name.to_owned(),
                n_dims: dims.len() as u32,
            });
        }
        let n: Option<u64> = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let bytes = n.and_then(|n| ty.tensor_bytes(dims.first().copied().unwrap_or(1), n));
        if bytes != Some(data.len() as u64) {
            return Err(GgufError::Metadata {
                key: name.to_owned(),
                problem: format!(
                    "{} tensor of dims {dims:?} needs {bytes:?} bytes, got {}",
                    ty.name,
                    data.len()
                ),
            });
        }
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            ty,
            dims: dims.to_vec(),
            data,
        });
        Ok(self)
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
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
            offset = self.padded(offset + t.data.len() as u64);
        }
        header.resize(self.padded(header.len() as u64) as usize, 0);
        w.write_all(&header)?;
        let mut written = 0u64;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            written += t.data.len() as u64;
            let pad = self.padded(written) - written;
            w.write_all(&vec![0u8; pad as usize])?;
            written += pad;
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }

    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        self.write_to(&mut file).map_err(io)?;
        file.flush().map_err(io)
    }

    fn padded(&self, v: u64) -> u64 {
        v.div_ceil(self.alignment) * self.alignment
    }
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
