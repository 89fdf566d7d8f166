//! gguf-py, the official Python GGUF package, as a second opinion on our reader and writer
//! (through `tests/py/gguf_crosscheck.py`). Needs `.venv/` from `scripts/setup-python.sh`, or
//! a Python with `gguf` in `KVBITS_PYTHON`; without one the tests skip, unless
//! `KVBITS_REQUIRE_GGUF_PY=1` (as in CI), when they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TempPath, all_values, random_bytes, random_dims, seed};
use kvbits::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue, Value};
use kvbits::rng::Rng;
use serde_json::{Value as J, json};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/gguf_crosscheck.py");

/// The Python to run, or `None` (after saying why) when the tests should skip.
fn python() -> Option<PathBuf> {
    let py = std::env::var_os("KVBITS_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        PathBuf::from,
    );
    let works = Command::new(&py)
        .args(["-c", "import gguf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Some(py);
    }
    let why = format!(
        "{} cannot import gguf: run scripts/setup-python.sh (or set KVBITS_PYTHON)",
        py.display()
    );
    if std::env::var("KVBITS_REQUIRE_GGUF_PY").is_ok_and(|v| v == "1") {
        panic!("KVBITS_REQUIRE_GGUF_PY=1 but {why}");
    }
    println!("SKIPPED: the gguf-py cross-check: {why}");
    None
}

fn run(py: &Path, args: &[&str]) -> String {
    let out = Command::new(py).arg(SCRIPT).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "gguf_crosscheck.py {args:?} failed:\n{text}"
    );
    text
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A value in the description's form (see the script): ints and bools as themselves, floats
/// as bit patterns, strings as hex, arrays as {"elem", "items"}.
fn meta_json(v: &MetaValue) -> J {
    use MetaValue as M;
    match v {
        M::U8(x) => json!(x),
        M::I8(x) => json!(x),
        M::U16(x) => json!(x),
        M::I16(x) => json!(x),
        M::U32(x) => json!(x),
        M::I32(x) => json!(x),
        M::U64(x) => json!(x),
        M::I64(x) => json!(x),
        M::F32(x) => json!(x.to_bits()),
        M::F64(x) => json!(x.to_bits()),
        M::Bool(x) => json!(x),
        M::String(s) => json!(hex(s.as_bytes())),
        M::Array(elem, items) => {
            json!({"elem": elem.name(), "items": items.iter().map(meta_json).collect::<Vec<_>>()})
        }
    }
}

/// As [`meta_json`], for a value as read (strings may not be UTF-8, so not via `to_owned`).
fn value_json(v: &Value<'_>) -> J {
    match v {
        Value::String(s) => json!(hex(s)),
        Value::Array(a) => {
            json!({"elem": a.elem.name(), "items": a.iter().map(|x| value_json(&x)).collect::<Vec<_>>()})
        }
        v => meta_json(&v.to_owned()),
    }
}

/// gguf-py writes a file with every value type and a spread of tensor types; we must read
/// back exactly what it says it wrote. Its ggml type table must also agree with ours.
#[test]
fn we_read_what_gguf_py_writes() {
    let Some(py) = python() else { return };
    let seed = seed("we_read_what_gguf_py_writes");
    let (file, desc) = (TempPath::new("py.gguf"), TempPath::new("py.json"));
    let (file_s, desc_s) = (file.0.to_str().unwrap(), desc.0.to_str().unwrap());
    run(&py, &["write", file_s, desc_s, &seed.to_string()]);
    let want: J = serde_json::from_slice(&std::fs::read(&desc.0).unwrap()).unwrap();

    let mapped = GgufFile::open(&file.0).unwrap();
    let g = mapped.parse().unwrap();
    assert_eq!(json!(g.version), want["version"]);
    assert_eq!(json!(g.alignment), want["alignment"]);

    let want_md = want["metadata"].as_array().unwrap();
    let keys: Vec<&str> = g.metadata().iter().map(|(k, _)| *k).collect();
    let want_keys: Vec<&str> = want_md.iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, want_keys, "keys in file order");
    for ((key, v), w) in g.metadata().iter().zip(want_md) {
        let got = json!({"key": key, "type": v.value_type().name(), "value": value_json(v)});
        assert_eq!(&got, w, "metadata '{key}'");
    }

    let want_t = want["tensors"].as_array().unwrap();
    assert_eq!(g.tensors().len(), want_t.len());
    for (t, w) in g.tensors().iter().zip(want_t) {
        let got =
            json!({"name": t.name, "type": t.ty.id, "dims": t.dims, "data": hex(g.tensor_data(t))});
        assert_eq!(&got, w, "tensor '{}'", t.name);
        assert_eq!(t.offset % g.alignment, 0);
    }

    // gguf-py's table of (values per block, bytes per block) and names, against ours.
    let sizes = want["quant_sizes"].as_object().unwrap();
    assert!(sizes.len() >= 30, "gguf-py knows most types");
    for (id, size) in sizes {
        let t = GgmlType::from_id(id.parse().unwrap()).unwrap();
        if t.name == "Q8_1" {
            // gguf-py still has the pre-2023 block_q8_1 of two floats (40 bytes); ggml-common.h
            // has two ggml_half (36), static_assert'ed. Only an intermediate type: never in files.
            assert_eq!((t.block, t.bytes), (32, 36));
            assert_eq!(
                *size,
                json!([32, 40]),
                "gguf-py fixed Q8_1: drop this exception"
            );
            continue;
        }
        assert_eq!(json!([t.block, t.bytes]), *size, "{}", t.name);
        assert_eq!(json!(t.name), want["quant_names"][id], "type {id}");
    }
    println!(
        "read {} keys and {} tensors written by gguf-py",
        keys.len(),
        want_t.len()
    );
}

/// We write a file with every value type (empty arrays and non-ASCII strings included) and
/// tensors of the types gguf-py knows; gguf-py must read what we describe.
#[test]
fn gguf_py_reads_what_we_write() {
    let Some(py) = python() else { return };
    let mut rng = Rng::new(seed("gguf_py_reads_what_we_write"));
    for (version, alignment) in [(2, None), (3, Some(64u32))] {
        let mut w = GgufWriter::new().version(version);
        let mut metadata = vec![("general.architecture".to_string(), "kvbits".into())];
        if let Some(a) = alignment {
            metadata.push(("general.alignment".to_string(), MetaValue::U32(a)));
        }
        metadata.extend(all_values(&mut rng));
        for (k, v) in &metadata {
            w.add(k, v.clone()).unwrap();
        }
        let mut tensors = vec![];
        // Q2_0 (42) is newer than the pinned gguf-py.
        let types = [
            "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "IQ4_XS", "TQ1_0", "MXFP4",
            "NVFP4", "Q1_0", "I8", "I16", "I32", "I64", "F64",
        ];
        for (i, name) in types.iter().enumerate() {
            let ty = GgmlType::from_name(name).unwrap();
            let dims = random_dims(&mut rng, ty, 1 + i % 4);
            let n: u64 = dims.iter().product();
            let data = random_bytes(&mut rng, (n / ty.block * ty.bytes) as usize);
            let tname = format!("blk.{i}.{name}");
            w.add_tensor(&tname, ty, &dims, data.clone()).unwrap();
            tensors.push(json!({"name": tname, "type": ty.id, "dims": dims, "data": hex(&data)}));
        }
        let desc = json!({
            "version": version,
            "alignment": alignment.unwrap_or(32),
            "metadata": metadata.iter().map(|(k, v)| {
                json!({"key": k, "type": v.value_type().name(), "value": meta_json(v)})
            }).collect::<Vec<_>>(),
            "tensors": tensors,
        });
        let (file, expected) = (TempPath::new("ours.gguf"), TempPath::new("ours.json"));
        w.write_file(&file.0).unwrap();
        std::fs::write(&expected.0, serde_json::to_vec(&desc).unwrap()).unwrap();
        let out = run(
            &py,
            &[
                "check",
                file.0.to_str().unwrap(),
                expected.0.to_str().unwrap(),
            ],
        );
        println!("v{version}: {}", out.trim());
    }
}
