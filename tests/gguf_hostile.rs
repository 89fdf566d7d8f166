//! Hostile GGUF input: every truncation, random corruption, and lengths and counts near
//! u64::MAX. The parser must return an error (never panic), finish quickly, and never make a
//! single allocation larger than the file plus a small constant.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use common::{Raw, SampleTensor, sample, seed, walk};
use kvbits::gguf::{Gguf, GgufError};
use kvbits::rng::Rng;

/// Records the largest single allocation made on this thread (tests run on several threads).
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What parsing may allocate at once beyond the file's own size.
const SLACK: usize = 64 << 10;

/// Parse `bytes` as a hostile file: measure the largest allocation and the time, check what
/// a successful parse hands out (see `walk`), and return the error if any.
fn parse_hostile(bytes: &[u8], what: &str) -> Result<(), GgufError> {
    LARGEST.with(|l| l.set(0));
    let start = Instant::now();
    let result = Gguf::parse(bytes).map(|g| {
        walk(&g);
    });
    let elapsed = start.elapsed();
    let largest = LARGEST.with(|l| l.get());
    assert!(
        largest <= bytes.len() + SLACK,
        "{what}: allocated {largest} bytes at once for a {}-byte file",
        bytes.len()
    );
    // Generous for a debug build on a busy machine; a walk over a huge count takes far longer.
    assert!(elapsed < Duration::from_secs(1), "{what}: took {elapsed:?}");
    result
}

/// A small file from our writer, mostly header, so that damage lands in what gets parsed.
fn small_sample(rng: &mut Rng) -> (Vec<u8>, Vec<SampleTensor>) {
    let s = sample(rng, 3, Some(16));
    (s.writer.to_bytes(), s.tensors)
}

#[test]
fn every_truncation_is_an_error_unless_only_padding_goes() {
    let mut rng = Rng::new(seed(
        "every_truncation_is_an_error_unless_only_padding_goes",
    ));
    let (bytes, tensors) = small_sample(&mut rng);
    let g = Gguf::parse(&bytes).unwrap();
    let data_end = g
        .tensors()
        .iter()
        .map(|t| g.data_offset + t.offset + t.bytes)
        .max()
        .unwrap() as usize;
    // The last tensor ends on an alignment boundary in about half the samples: then no
    // trailing padding exists and every cut must fail.
    assert!(
        data_end <= bytes.len(),
        "tensor data past the end of the sample"
    );
    println!("{} bytes, data ends at {data_end}", bytes.len());
    for cut in 0..bytes.len() {
        let what = format!("cut at {cut}");
        match parse_hostile(&bytes[..cut], &what) {
            Err(_) => assert!(cut < data_end, "{what}: only trailing padding was cut"),
            Ok(()) => {
                assert!(cut >= data_end, "{what} parsed but removed data");
                let g = Gguf::parse(&bytes[..cut]).unwrap();
                for (t, want) in g.tensors().iter().zip(&tensors) {
                    let got = (t.name, g.tensor_data(t));
                    assert_eq!(got, (&want.name[..], &want.data[..]), "{what}");
                }
            }
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let mut rng = Rng::new(seed("random_corruption_never_panics"));
    let (bytes, _) = small_sample(&mut rng);
    let header_len = Gguf::parse(&bytes).unwrap().data_offset as usize;
    let (mut parsed, mut failed) = (0, 0);
    for round in 0..4000 {
        let mut bad = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly in the header, where a flipped byte changes how the rest is read.
            let at = if rng.below(8) == 0 {
                rng.below(bad.len())
            } else {
                rng.below(header_len)
            };
            bad[at] = match rng.below(4) {
                0 => bad[at] ^ (1 << rng.below(8)),
                1 => 0xff,
                2 => 0,
                _ => rng.next_u64() as u8,
            };
        }
        if rng.below(4) == 0 {
            bad.truncate(rng.below(bad.len()));
        }
        match parse_hostile(&bad, &format!("round {round}")) {
            Ok(()) => parsed += 1,
            Err(_) => failed += 1,
        }
    }
    println!("{parsed} corrupted files still parsed, {failed} were rejected");
    assert!(
        failed > 0 && parsed > 0,
        "the corruption hits both outcomes"
    );
}

/// A file whose counts or lengths are near u64::MAX, in a body of `filler` zero bytes.
fn huge(build: impl FnOnce(&mut Raw), filler: usize) -> Vec<u8> {
    let mut r = Raw::default();
    build(&mut r);
    r.zeros(filler);
    r.0
}

#[test]
fn lengths_and_counts_near_u64_max_are_errors() {
    let maxes = [
        u64::MAX,
        u64::MAX - 7,
        u64::MAX / 8 + 1,
        1 << 63,
        i64::MAX as u64,
    ];
    let mut cases: Vec<(String, Vec<u8>)> = vec![];
    for &m in &maxes {
        for filler in [0, 64, 1 << 20] {
            let mut add = |what: &str, build: &dyn Fn(&mut Raw)| {
                cases.push((
                    format!("{what} = {m:#x}, {filler} bytes more"),
                    huge(build, filler),
                ));
            };
            add("n_tensors", &|r| *r = Raw::header(3, m, 0));
            add("n_kv", &|r| *r = Raw::header(3, 0, m));
            add("both counts", &|r| *r = Raw::header(2, m, m));
            add("key length", &|r| {
                *r = Raw::header(3, 0, 1);
                r.u64(m);
            });
            add("string length", &|r| {
                *r = Raw::header(3, 0, 1);
                r.key("k", 8).u64(m);
            });
            for elem in [0, 7, 4, 10, 8] {
                add(&format!("array length (type {elem})"), &|r| {
                    *r = Raw::header(3, 0, 1);
                    r.key("k", 9).u32(elem).u64(m);
                });
            }
            add("element string length", &|r| {
                *r = Raw::header(3, 0, 1);
                r.key("k", 9).u32(8).u64(2).str("a").u64(m);
            });
            add("tensor name length", &|r| {
                *r = Raw::header(3, 1, 0);
                r.u64(m);
            });
            add("n_dims", &|r| {
                *r = Raw::header(3, 1, 0);
                r.str("t").u32((m >> 32) as u32);
            });
            for at in 0..4 {
                add(&format!("dim {at}"), &|r| {
                    let mut dims = [1u64; 4];
                    dims[at] = m;
                    *r = Raw::header(3, 1, 0);
                    r.tensor("t", &dims, 0, 0);
                });
            }
            add("tensor offset", &|r| {
                *r = Raw::header(3, 1, 0);
                r.tensor("t", &[4], 0, m & !31);
            });
            add("tensor type", &|r| {
                *r = Raw::header(3, 1, 0);
                r.tensor("t", &[4], (m >> 32) as u32, 0);
            });
            add("alignment", &|r| {
                *r = Raw::header(3, 1, 1);
                r.key("general.alignment", 10).u64(m);
                r.tensor("t", &[4], 0, 0);
            });
        }
    }
    for (what, bytes) in &cases {
        match parse_hostile(bytes, what) {
            Err(e) => {
                let ok = matches!(
                    e,
                    GgufError::Truncated { .. }
                        | GgufError::DuplicateKey(_)
                        | GgufError::DuplicateTensor(_)
                        | GgufError::TooManyDims { .. }
                        | GgufError::DimsOverflow { .. }
                        | GgufError::UnknownTensorType { .. }
                        | GgufError::TensorOutOfBounds { .. }
                        | GgufError::BadAlignment(_)
                );
                assert!(ok, "{what}: {e:?}");
            }
            Ok(()) => panic!("{what}: parsed"),
        }
    }
    println!("{} files with huge lengths or counts rejected", cases.len());
}

/// Reservations from header counts are bounded by what the file can hold: a 1 MiB file that
/// claims u64::MAX entries reserves no more than its size. (Each entry is larger in memory than
/// its smallest encoding, so reserving by "count, capped at what the rest of the file could
/// encode" would reserve several times the file.) The zero body parses as one empty-named
/// entry, then the same name again.
#[test]
fn counts_do_not_drive_allocation() {
    for (n_tensors, n_kv) in [(u64::MAX, 0), (0, u64::MAX), (u64::MAX, 1)] {
        let mut r = Raw::header(3, n_tensors, n_kv);
        if n_kv == 1 {
            r.key("k", 0).bytes(&[0]);
        }
        r.zeros(1 << 20);
        let what = format!("{n_tensors:#x} tensors, {n_kv:#x} keys in 1 MiB");
        let e = parse_hostile(&r.0, &what).unwrap_err();
        assert!(
            matches!(
                e,
                GgufError::DuplicateKey(_) | GgufError::DuplicateTensor(_)
            ),
            "{what}: {e:?}"
        );
    }
}
