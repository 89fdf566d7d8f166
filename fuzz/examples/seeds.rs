//! Write a starting corpus for the fuzzer: small files from our writer, v2 and v3, with
//! several alignments, and the hand-made edge cases the tests use.

#[path = "../../tests/common/mod.rs"]
mod common;

use kvbits::rng::Rng;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seeds DIR");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(Rng::fresh_seed());
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        std::fs::write(format!("{dir}/seed-{n:03}.gguf"), bytes).unwrap();
        n += 1;
    };
    for version in [2, 3] {
        for alignment in [None, Some(1), Some(8), Some(64)] {
            put(&common::sample(&mut rng, version, alignment)
                .writer
                .to_bytes());
        }
    }
    // No tensors; only an empty tensor; one key of each array kind.
    let mut r = common::Raw::header(3, 0, 1);
    r.key("k", 9).u32(8).u64(2).str("a").str("");
    put(&r.0);
    let mut r = common::Raw::header(3, 1, 0);
    r.tensor("e", &[0, 4], 0, 0).pad(32);
    put(&r.0);
    println!("wrote {n} seeds to {dir}");
}
