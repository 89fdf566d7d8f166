//! The C ABI: opaque handles, `kvb_` names, `int` statuses and a thread-local error message.
//! `ffi/kvbits.h` is generated from this module by cbindgen (tests/ffi_header.rs keeps it
//! fresh), so the doc comments here are the header's.
//!
//! Every entry point runs in [`status::guard`]: a panic never unwinds into C, it becomes
//! `KVB_ERR_INTERNAL`. Every pointer is checked for NULL and alignment, every count for sign,
//! zero and overflow, every layer against the cache.
#![allow(non_camel_case_types)] // C's names, as the header spells them

mod cache;
mod model;
mod params;
mod rows;
mod status;

pub use cache::*;
pub use model::*;
pub use params::*;
pub use rows::*;
pub use status::{
    KVB_ERR_CUDA, KVB_ERR_FORMAT, KVB_ERR_INTERNAL, KVB_ERR_INVALID_ARGUMENT, KVB_ERR_IO,
    KVB_ERR_NO_CUDA, KVB_ERR_OUT_OF_MEMORY, KVB_ERR_UNSUPPORTED, KVB_OK, kvb_last_error,
};

use std::ffi::c_char;

/// The library's version ("0.1.0"), a static string.
#[unsafe(no_mangle)]
pub extern "C" fn kvb_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
