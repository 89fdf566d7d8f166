//! Parse arbitrary bytes as GGUF; when that succeeds, walk every metadata value (array
//! elements included) and every tensor's data, checking what the parser promised.
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use kvbits::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse(data) {
        std::hint::black_box(common::walk(&g));
    }
});
