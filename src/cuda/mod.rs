//! CUDA: the kernels in `csrc/` and our own thin runtime calls (`csrc/runtime.cu`), bound by
//! bindgen from `csrc/kvbits_cuda.h`. Built only with the `cuda` feature.
//!
//! Why not `cuda-sys`: it is unmaintained, stops at old toolkits and links the driver API we do
//! not need; the dozen runtime calls kvbits makes are a few lines of C++ next to the kernels.

pub mod bench;
mod cache;
pub mod kernels;
mod runtime;

pub use cache::DeviceCache;
pub use runtime::{
    DeviceBuffer, Event, OnDevice, Stream, device_count, device_info, on_device, pointer_device,
    set_device,
};

#[allow(non_camel_case_types, non_upper_case_globals, dead_code)]
pub(crate) mod sys {
    include!(concat!(env!("OUT_DIR"), "/cuda_sys.rs"));
}
