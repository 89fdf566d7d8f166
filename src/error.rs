//! The crate's error type. Every message names the thing at fault and, where it helps,
//! what to do next.

use std::fmt;
use std::path::PathBuf;

use crate::gguf::GgufError;

#[derive(Debug)]
pub enum Error {
    /// A malformed or unsupported GGUF file.
    Gguf(GgufError),
    /// Reading or writing a file failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An argument is out of range or does not match a shape.
    InvalidArgument(String),
    /// Well-formed input that kvbits does not handle (yet).
    Unsupported(String),
    /// NaN or infinity in a block to quantize.
    NonFinite { token: usize, channel: usize },
    /// A CUDA call failed (`code` is the cudaError_t).
    Cuda {
        call: &'static str,
        code: i32,
        message: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Gguf(e) => e.fmt(f),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::InvalidArgument(msg) => write!(f, "invalid argument: {msg}"),
            Error::Unsupported(msg) => write!(f, "unsupported: {msg}"),
            Error::NonFinite { token, channel } => write!(
                f,
                "non-finite value (NaN or infinity) at token {token}, channel {channel}: \
                 KV values must be finite to be quantized"
            ),
            Error::Cuda {
                call,
                code,
                message,
            } => write!(f, "CUDA error in {call}: {message} ({code})"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Gguf(e) => Some(e),
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<GgufError> for Error {
    fn from(e: GgufError) -> Self {
        Error::Gguf(e)
    }
}
