//! kvbits: 1-2 bit KV caches for multimodal (image and video) LLMs, as a plugin backend for
//! llama.cpp-style runtimes.
//!
//! - [`gguf`]: a zero-copy GGUF reader and a writer.
//! - [`model`]: a model's KV shape from its LLM and mmproj GGUF files.
//! - [`kv`]: the cache formats, one file each, in one table.
//! - [`ffi`]: the C ABI (`ffi/kvbits.h`).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod eval;
pub mod ffi;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod rng;

pub use error::Error;
