//! Safe owners of device memory, streams and events, over `kvb_cuda_*`.

use std::ffi::CStr;
use std::os::raw::c_void;
use std::ptr;

use super::sys;
use crate::Error;

/// Turn a `kvb_cuda_*` status into a `Result`, naming the call.
pub(crate) fn check(code: i32, call: &'static str) -> Result<(), Error> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: kvb_cuda_error_string returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr(sys::kvb_cuda_error_string(code)) };
    Err(Error::Cuda {
        call,
        code,
        message: msg.to_string_lossy().into_owned(),
    })
}

/// GPUs visible to this process; 0 where there is no driver or device.
pub fn device_count() -> usize {
    let mut n = 0;
    // SAFETY: writes one int.
    let code = unsafe { sys::kvb_cuda_device_count(&mut n) };
    if code == 0 { n.max(0) as usize } else { 0 }
}

pub fn set_device(device: usize) -> Result<(), Error> {
    // SAFETY: plain call.
    check(
        unsafe { sys::kvb_cuda_set_device(device as i32) },
        "cudaSetDevice",
    )
}

/// The calling thread's current device switched to another until this is dropped: a library
/// call must leave the host's current device as it found it.
pub struct OnDevice {
    previous: Option<i32>,
}

/// Makes `device` current for the calling thread until the result is dropped.
pub fn on_device(device: usize) -> Result<OnDevice, Error> {
    let mut current = 0;
    // SAFETY: writes one int.
    check(
        unsafe { sys::kvb_cuda_get_device(&mut current) },
        "cudaGetDevice",
    )?;
    if current == device as i32 {
        return Ok(OnDevice { previous: None });
    }
    set_device(device)?;
    Ok(OnDevice {
        previous: Some(current),
    })
}

impl Drop for OnDevice {
    fn drop(&mut self) {
        if let Some(d) = self.previous {
            // SAFETY: plain call; a device that was current before is valid.
            unsafe { sys::kvb_cuda_set_device(d) };
        }
    }
}

/// The GPU `ptr` points into, or `None` for host memory (or a pointer CUDA does not know).
#[allow(clippy::not_unsafe_ptr_arg_deref)] // the driver is asked about the address; nothing is read
pub fn pointer_device(ptr: *const c_void) -> Result<Option<usize>, Error> {
    let mut device = -1;
    // SAFETY: only asks the driver about the address; writes one int.
    check(
        unsafe { sys::kvb_cuda_pointer_device(ptr, &mut device) },
        "cudaPointerGetAttributes",
    )?;
    Ok(usize::try_from(device).ok())
}

/// Name, multiprocessor count and L2 bytes of `device`.
pub fn device_info(device: usize) -> Result<(String, usize, usize), Error> {
    let mut name = [0u8; 256];
    let (mut sms, mut l2) = (0, 0);
    // SAFETY: `name` has the length passed; the call writes a NUL-terminated string into it.
    check(
        unsafe {
            sys::kvb_cuda_device_info(
                device as i32,
                name.as_mut_ptr().cast(),
                name.len(),
                &mut sms,
                &mut l2,
            )
        },
        "cudaGetDeviceProperties",
    )?;
    let name = CStr::from_bytes_until_nul(&name)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((name, sms as usize, l2 as usize))
}

/// A non-blocking CUDA stream, or a borrowed one (a host's `cudaStream_t`).
pub struct Stream {
    raw: sys::kvb_cuda_stream,
    owned: bool,
}

// SAFETY: a CUDA stream handle may be used from any thread.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    pub fn new() -> Result<Stream, Error> {
        let mut raw = ptr::null_mut();
        // SAFETY: writes one handle.
        check(
            unsafe { sys::kvb_cuda_stream_create(&mut raw) },
            "cudaStreamCreate",
        )?;
        Ok(Stream { raw, owned: true })
    }

    /// Work on a stream the host owns (NULL is the default stream).
    ///
    /// # Safety
    /// `raw` must be a valid `cudaStream_t` (or NULL) that outlives this value.
    pub unsafe fn borrowed(raw: *mut c_void) -> Stream {
        Stream { raw, owned: false }
    }

    pub fn raw(&self) -> sys::kvb_cuda_stream {
        self.raw
    }

    pub fn synchronize(&self) -> Result<(), Error> {
        // SAFETY: the handle is valid for self's lifetime.
        check(
            unsafe { sys::kvb_cuda_stream_synchronize(self.raw) },
            "cudaStreamSynchronize",
        )
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: created by kvb_cuda_stream_create, destroyed once.
            unsafe { sys::kvb_cuda_stream_destroy(self.raw) };
        }
    }
}

/// A CUDA event, for timing kernels on the GPU's own clock.
pub struct Event {
    raw: sys::kvb_cuda_event,
}

impl Event {
    pub fn new() -> Result<Event, Error> {
        let mut raw = ptr::null_mut();
        // SAFETY: writes one handle.
        check(
            unsafe { sys::kvb_cuda_event_create(&mut raw) },
            "cudaEventCreate",
        )?;
        Ok(Event { raw })
    }

    pub fn record(&self, stream: &Stream) -> Result<(), Error> {
        // SAFETY: both handles are valid.
        check(
            unsafe { sys::kvb_cuda_event_record(self.raw, stream.raw) },
            "cudaEventRecord",
        )
    }

    /// Milliseconds from `self` to `end` (waits for `end`).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32, Error> {
        let mut ms = 0.0;
        // SAFETY: both events are valid.
        check(
            unsafe { sys::kvb_cuda_event_elapsed_ms(&mut ms, self.raw, end.raw) },
            "cudaEventElapsedTime",
        )?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by kvb_cuda_event_create, destroyed once.
        unsafe { sys::kvb_cuda_event_destroy(self.raw) };
    }
}

/// Device memory of `len` bytes, freed on drop.
pub struct DeviceBuffer {
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: device pointers carry no thread affinity.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    pub fn new(len: usize) -> Result<DeviceBuffer, Error> {
        let mut ptr = ptr::null_mut();
        // cudaMalloc(0) gives no usable pointer; keep one byte so every buffer is real.
        // SAFETY: writes one pointer.
        check(
            unsafe { sys::kvb_cuda_malloc(&mut ptr, len.max(1)) },
            "cudaMalloc",
        )?;
        Ok(DeviceBuffer { ptr, len })
    }

    /// A buffer holding `data`, copied on `stream` (complete when the stream is).
    pub fn from_slice<T: Copy>(data: &[T], stream: &Stream) -> Result<DeviceBuffer, Error> {
        let buf = DeviceBuffer::new(std::mem::size_of_val(data))?;
        buf.upload(data, 0, stream)?;
        stream.synchronize()?;
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr
    }

    fn range(&self, offset: usize, bytes: usize) -> Result<*mut c_void, Error> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.len => Ok(self.ptr.cast::<u8>().wrapping_add(offset).cast()),
            _ => Err(Error::InvalidArgument(format!(
                "{bytes} bytes at offset {offset} of a {}-byte device buffer",
                self.len
            ))),
        }
    }

    /// Copy `data` to byte `offset`; the host slice must stay alive until `stream` completes.
    pub fn upload<T: Copy>(&self, data: &[T], offset: usize, stream: &Stream) -> Result<(), Error> {
        let bytes = std::mem::size_of_val(data);
        let dst = self.range(offset, bytes)?;
        // SAFETY: `dst..dst+bytes` lies in this buffer; the source is a live host slice.
        check(
            unsafe { sys::kvb_cuda_memcpy_htod(dst, data.as_ptr().cast(), bytes, stream.raw) },
            "cudaMemcpyAsync",
        )
    }

    /// Copy bytes from `offset` into `out` and wait for the copy.
    pub fn download<T: Copy>(
        &self,
        out: &mut [T],
        offset: usize,
        stream: &Stream,
    ) -> Result<(), Error> {
        let bytes = std::mem::size_of_val(out);
        let src = self.range(offset, bytes)?;
        // SAFETY: `src..src+bytes` lies in this buffer; `out` is a live, writable host slice of
        // plain-data elements and we wait for the copy before returning.
        check(
            unsafe { sys::kvb_cuda_memcpy_dtoh(out.as_mut_ptr().cast(), src, bytes, stream.raw) },
            "cudaMemcpyAsync",
        )?;
        stream.synchronize()
    }

    /// Copy `bytes` from `src` at `src_offset` to `dst_offset` (ranges of distinct buffers).
    pub fn copy_range_from(
        &self,
        dst_offset: usize,
        src: &DeviceBuffer,
        src_offset: usize,
        bytes: usize,
        stream: &Stream,
    ) -> Result<(), Error> {
        let src = src.range(src_offset, bytes)?;
        // SAFETY: `src_offset..+bytes` lies in `src`; the destination is checked the same way.
        unsafe { self.copy_to_ptr_from(dst_offset, src, bytes, stream) }
    }

    /// Copy `bytes` from `offset` to device memory at `dst`.
    ///
    /// # Safety
    /// `dst` must point to `bytes` of writable device memory that does not overlap the source.
    pub unsafe fn copy_to_ptr(
        &self,
        offset: usize,
        dst: *mut c_void,
        bytes: usize,
        stream: &Stream,
    ) -> Result<(), Error> {
        let src = self.range(offset, bytes)?;
        // SAFETY: the source range lies in this buffer; `dst` is the caller's promise.
        check(
            unsafe { sys::kvb_cuda_memcpy_dtod(dst, src, bytes, stream.raw) },
            "cudaMemcpyAsync",
        )
    }

    /// Copy `bytes` of device memory at `src` to `offset` of this buffer.
    ///
    /// # Safety
    /// `src` must point to `bytes` of readable device memory that does not overlap the
    /// destination.
    unsafe fn copy_to_ptr_from(
        &self,
        offset: usize,
        src: *const c_void,
        bytes: usize,
        stream: &Stream,
    ) -> Result<(), Error> {
        let dst = self.range(offset, bytes)?;
        // SAFETY: the destination range lies in this buffer; `src` is the caller's promise.
        check(
            unsafe { sys::kvb_cuda_memcpy_dtod(dst, src, bytes, stream.raw) },
            "cudaMemcpyAsync",
        )
    }

    /// Set every byte to `value` (tests poison outputs this way).
    pub fn fill(&self, value: u8, stream: &Stream) -> Result<(), Error> {
        // SAFETY: the whole buffer.
        check(
            unsafe { sys::kvb_cuda_memset(self.ptr, value as i32, self.len, stream.raw) },
            "cudaMemsetAsync",
        )
    }

    /// Copy all of `src` (no larger than `self`) with the plain copy kernel: the bandwidth
    /// reference of the benchmarks.
    pub fn copy_from(&self, src: &DeviceBuffer, stream: &Stream) -> Result<(), Error> {
        let dst = self.range(0, src.len)?;
        // SAFETY: both ranges lie in live device buffers.
        check(
            unsafe { sys::kvb_cuda_copy_kernel(dst, src.ptr, src.len, stream.raw) },
            "copy kernel",
        )
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by kvb_cuda_malloc, freed once.
        unsafe { sys::kvb_cuda_free(self.ptr) };
    }
}
