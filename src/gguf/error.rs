//! What can be wrong with a GGUF file. Each variant names the item at fault.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum GgufError {
    BadMagic([u8; 4]),
    UnsupportedVersion(u32),
    /// `item` needs `need` bytes where only `have` are left.
    Truncated {
        item: String,
        need: u64,
        have: u64,
    },
    BadString(String),
    BadBool {
        item: String,
        byte: u8,
    },
    UnknownValueType {
        item: String,
        id: u32,
    },
    NestedArray(String),
    DuplicateKey(String),
    BadAlignment(String),
    TooManyDims {
        tensor: String,
        n_dims: u32,
    },
    DimsOverflow {
        tensor: String,
        dims: Vec<u64>,
    },
    UnknownTensorType {
        tensor: String,
        id: u32,
    },
    RetiredTensorType {
        tensor: String,
        ty: &'static str,
    },
    PartialBlock {
        tensor: String,
        ne0: u64,
        ty: &'static str,
        block: u64,
    },
    DuplicateTensor(String),
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        bytes: u64,
        data_len: u64,
    },
    Overlap(String, String),
    /// A metadata key a caller needs is absent or of the wrong type.
    Metadata {
        key: String,
        problem: String,
    },
    /// A tensor a caller needs is absent, or its contents are not what the caller wrote.
    Tensor {
        tensor: String,
        problem: String,
    },
    /// Any of the above, in a named file.
    InFile {
        path: PathBuf,
        error: Box<GgufError>,
    },
}

impl GgufError {
    pub fn in_file(self, path: &Path) -> GgufError {
        match self {
            e @ GgufError::InFile { .. } => e,
            e => GgufError::InFile {
                path: path.to_path_buf(),
                error: Box::new(e),
            },
        }
    }

    /// The error without the file it occurred in.
    pub fn kind(&self) -> &GgufError {
        match self {
            GgufError::InFile { error, .. } => error.kind(),
            e => e,
        }
    }
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgufError::*;
        match self {
            BadMagic(m) => write!(
                f,
                "not a GGUF file: magic is {:?}, expected \"GGUF\"",
                String::from_utf8_lossy(m)
            ),
            UnsupportedVersion(v) if matches!(v.swap_bytes(), 1..=3) => write!(
                f,
                "GGUF version {v} looks byte-swapped: big-endian GGUF files are not supported"
            ),
            UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported GGUF version {v} (kvbits reads versions 2 and 3)"
                )
            }
            Truncated { item, need, have } => write!(
                f,
                "truncated file: {item} needs {need} bytes but only {have} are left"
            ),
            BadString(item) => write!(f, "{item} is not valid UTF-8"),
            BadBool { item, byte } => write!(f, "{item}: bool byte is {byte}, expected 0 or 1"),
            UnknownValueType { item, id } => {
                write!(f, "{item}: unknown value type {id} (GGUF defines 0 to 12)")
            }
            NestedArray(key) => write!(f, "array '{key}' holds arrays, which are not supported"),
            DuplicateKey(key) => write!(f, "metadata key '{key}' appears twice"),
            BadAlignment(v) => {
                write!(
                    f,
                    "general.alignment is {v}; it must be a power of two no larger than 2^31"
                )
            }
            TooManyDims { tensor, n_dims } => {
                write!(
                    f,
                    "tensor '{tensor}' has {n_dims} dimensions; ggml allows at most 4"
                )
            }
            DimsOverflow { tensor, dims } => {
                write!(
                    f,
                    "tensor '{tensor}': dimensions {dims:?} overflow its size"
                )
            }
            UnknownTensorType { tensor, id } => write!(
                f,
                "tensor '{tensor}' has unknown ggml type {id} (kvbits knows 0 to 42); \
                 the file may come from a newer ggml"
            ),
            RetiredTensorType { tensor, ty } => write!(
                f,
                "tensor '{tensor}' uses {ty}, a type ggml has removed; re-convert the model"
            ),
            PartialBlock {
                tensor,
                ne0,
                ty,
                block,
            } => write!(
                f,
                "tensor '{tensor}': first dimension {ne0} is not a multiple of {ty}'s \
                 block size {block}"
            ),
            DuplicateTensor(name) => write!(f, "tensor '{name}' appears twice"),
            Misaligned {
                tensor,
                offset,
                alignment,
            } => write!(
                f,
                "tensor '{tensor}' starts at data offset {offset}, not a multiple of the \
                 alignment {alignment}"
            ),
            TensorOutOfBounds {
                tensor,
                offset,
                bytes,
                data_len,
            } => write!(
                f,
                "tensor '{tensor}' ({bytes} bytes at data offset {offset}) runs past the end \
                 of the data section ({data_len} bytes): the file is truncated or corrupt"
            ),
            Overlap(a, b) => write!(f, "tensors '{a}' and '{b}' overlap"),
            Metadata { key, problem } => write!(f, "metadata '{key}': {problem}"),
            Tensor { tensor, problem } => write!(f, "tensor '{tensor}': {problem}"),
            InFile { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for GgufError {}
