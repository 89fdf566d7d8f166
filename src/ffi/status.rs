//! Status codes, the thread-local error message, and the guard every entry point runs in.

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::Error;

/// Success.
pub const KVB_OK: c_int = 0;
/// A NULL pointer, a size out of range, a layer out of range, an unknown name or id.
pub const KVB_ERR_INVALID_ARGUMENT: c_int = -1;
/// A file could not be opened, read or written.
pub const KVB_ERR_IO: c_int = -2;
/// A malformed, truncated or damaged GGUF file or cache snapshot.
pub const KVB_ERR_FORMAT: c_int = -3;
/// Well-formed input that kvbits does not handle (yet): a head dim, a device.
pub const KVB_ERR_UNSUPPORTED: c_int = -4;
/// A CUDA path was called in a library built without the `cuda` feature.
pub const KVB_ERR_NO_CUDA: c_int = -5;
/// A CUDA call failed.
pub const KVB_ERR_CUDA: c_int = -6;
/// Out of device memory (a CUDA cache). The CPU calls do not return it: a failed host
/// allocation aborts, as in Rust.
pub const KVB_ERR_OUT_OF_MEMORY: c_int = -7;
/// A bug in kvbits (a panic was caught at the boundary); the message says where.
pub const KVB_ERR_INTERNAL: c_int = -8;

/// Why a call failed: its status and the message `kvb_last_error` returns.
#[derive(Debug)]
pub struct Fail {
    pub status: c_int,
    pub message: String,
}

impl Fail {
    pub fn new(status: c_int, message: impl Into<String>) -> Fail {
        Fail {
            status,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Fail {
        Fail::new(KVB_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let status = match &e {
            Error::Gguf(_) => KVB_ERR_FORMAT,
            Error::Io { .. } => KVB_ERR_IO,
            Error::InvalidArgument(_) | Error::NonFinite { .. } => KVB_ERR_INVALID_ARGUMENT,
            Error::Unsupported(_) => KVB_ERR_UNSUPPORTED,
            // cudaErrorMemoryAllocation
            Error::Cuda { code: 2, .. } => KVB_ERR_OUT_OF_MEMORY,
            Error::Cuda { .. } => KVB_ERR_CUDA,
        };
        Fail::new(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error.
pub fn set_last_error(message: &str) {
    // A message with a NUL inside would be cut short in C: drop the NULs instead.
    let c = CString::new(message.replace('\0', "")).unwrap_or_default();
    // `try_with`: nothing to record into while the thread is being torn down.
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = c);
}

/// The message of the most recent call on this thread that failed ("" if none has): valid
/// until the next failing call on this thread. Successful calls leave it as it is.
#[unsafe(no_mangle)]
pub extern "C" fn kvb_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|l| l.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// Runs an entry point's body: a panic becomes [`KVB_ERR_INTERNAL`], an error its status, and
/// either sets the thread's last error. Nothing unwinds into C.
pub fn guard(f: impl FnOnce() -> Result<(), Fail>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => KVB_OK,
        Ok(Err(fail)) => {
            set_last_error(&fail.message);
            fail.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("unknown panic");
            set_last_error(&format!(
                "internal error in kvbits (please report it with this message): {what}"
            ));
            KVB_ERR_INTERNAL
        }
    }
}

/// [`guard`] for entry points that return a value rather than a status: `fallback` on failure.
pub fn guard_value<T>(fallback: T, f: impl FnOnce() -> Result<T, Fail>) -> T {
    let mut out = None;
    let status = guard(|| {
        out = Some(f()?);
        Ok(())
    });
    match out {
        Some(v) if status == KVB_OK => v,
        _ => fallback,
    }
}

/// `p` as a reference, or an invalid-argument failure naming `what` when it is NULL.
///
/// # Safety
/// A non-NULL `p` must point to a valid `T` for the lifetime the caller picks.
pub unsafe fn arg<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    // SAFETY: non-NULL, and valid by the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Fail::invalid(format!("{what} is NULL")))
}

/// `p` as a mutable reference; see [`arg`].
///
/// # Safety
/// A non-NULL `p` must point to a valid `T`, not aliased, for the lifetime the caller picks.
pub unsafe fn arg_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: non-NULL, and valid and unaliased by the caller's contract.
    unsafe { p.as_mut() }.ok_or_else(|| Fail::invalid(format!("{what} is NULL")))
}

/// Checks what a slice of `len` `T`s at `p` needs beyond validity: not NULL, aligned, and at
/// most `isize::MAX` bytes.
fn check_slice<T>(p: *const T, len: usize, what: &str) -> Result<(), Fail> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    if !p.is_aligned() {
        return Err(Fail::invalid(format!(
            "{what} is not aligned to {} bytes",
            align_of::<T>()
        )));
    }
    if len
        .checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Fail::invalid(format!(
            "{what}: {len} elements overflow the address space"
        )));
    }
    Ok(())
}

/// `len` `T`s at `p`, checked by [`check_slice`].
///
/// # Safety
/// A non-NULL `p` must point to `len` initialised `T`s that live as long as the caller picks.
pub unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Fail> {
    check_slice(p, len, what)?;
    // SAFETY: checked above; validity is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `len` writable `T`s at `p`, checked by [`check_slice`].
///
/// # Safety
/// A non-NULL `p` must point to `len` writable `T`s, not aliased, for the lifetime picked.
pub unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Fail> {
    check_slice(p, len, what)?;
    // SAFETY: checked above; validity is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// A non-NULL `p` must point to a NUL-terminated string.
pub unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Fail::invalid(format!("{what} is not valid UTF-8")))
}

/// A count from C that must be positive, as a usize.
pub fn positive(n: i64, what: &str) -> Result<usize, Fail> {
    if n <= 0 {
        return Err(Fail::invalid(format!(
            "{what} is {n}: it must be at least 1"
        )));
    }
    usize::try_from(n).map_err(|_| Fail::invalid(format!("{what} = {n} is too large")))
}

/// A count from C that must not be negative, as a usize.
pub fn non_negative(n: i64, what: &str) -> Result<usize, Fail> {
    usize::try_from(n).map_err(|_| Fail::invalid(format!("{what} is {n}: it must be >= 0")))
}

/// `a * b`, or an invalid-argument failure naming `what` on overflow.
pub fn mul(a: usize, b: usize, what: &str) -> Result<usize, Fail> {
    a.checked_mul(b)
        .ok_or_else(|| Fail::invalid(format!("{what}: {a} x {b} overflows")))
}
