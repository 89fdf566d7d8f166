//! `ffi/kvbits.h` is what cbindgen makes of `src/ffi/` now: a stale header fails here.
//! `KVBITS_BLESS=1 cargo test --test ffi_header` rewrites it.

use std::path::Path;

#[test]
fn header_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen parses src/ffi")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = root.join("ffi/kvbits.h");
    if std::env::var_os("KVBITS_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write ffi/kvbits.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "ffi/kvbits.h is stale: regenerate it with `KVBITS_BLESS=1 cargo test --test ffi_header` \
         and commit it"
    );
}
