//! GGUF round trips through our writer and reader, the ggml type table against ggml's block
//! structs, and one error case per validation rule.

mod common;

use common::{Raw, TempPath, random_bytes, random_dims, sample, seed};
use kvbits::gguf::{
    DEFAULT_ALIGNMENT, GGML_TYPES, GgmlType, Gguf, GgufError, GgufFile, GgufWriter, MetaValue,
    Value, ValueType,
};
use kvbits::rng::Rng;

/// Whether a value read back is exactly the one written: floats bit for bit, strings byte
/// for byte, arrays element by element with the declared element type.
fn same(read: &Value<'_>, want: &MetaValue) -> bool {
    use MetaValue as M;
    match (read, want) {
        (Value::U8(a), M::U8(b)) => a == b,
        (Value::I8(a), M::I8(b)) => a == b,
        (Value::U16(a), M::U16(b)) => a == b,
        (Value::I16(a), M::I16(b)) => a == b,
        (Value::U32(a), M::U32(b)) => a == b,
        (Value::I32(a), M::I32(b)) => a == b,
        (Value::U64(a), M::U64(b)) => a == b,
        (Value::I64(a), M::I64(b)) => a == b,
        (Value::F32(a), M::F32(b)) => a.to_bits() == b.to_bits(),
        (Value::F64(a), M::F64(b)) => a.to_bits() == b.to_bits(),
        (Value::Bool(a), M::Bool(b)) => a == b,
        (Value::String(a), M::String(b)) => *a == b.as_bytes(),
        (Value::Array(a), M::Array(elem, items)) => {
            a.elem == *elem
                && a.len == items.len()
                && a.iter().count() == items.len()
                && a.iter().zip(items).all(|(x, y)| same(&x, y))
        }
        _ => false,
    }
}

/// Whether `s` lies inside `map`: the reader borrowed it rather than copying.
fn borrowed_from(s: &[u8], map: &[u8]) -> bool {
    let range = map.as_ptr_range();
    let (start, end) = (s.as_ptr(), s.as_ptr().wrapping_add(s.len()));
    range.start <= start && end <= range.end
}

#[test]
fn round_trip_every_value_and_tensor_type() {
    let mut rng = Rng::new(seed("round_trip_every_value_and_tensor_type"));
    for version in [2, 3] {
        for alignment in [None, Some(1), Some(32), Some(4096)] {
            let sample = sample(&mut rng, version, alignment);
            let w = &sample.writer;
            let tmp = TempPath::new("roundtrip.gguf");
            w.write_file(&tmp.0).unwrap();
            let file = GgufFile::open(&tmp.0).unwrap();
            assert_eq!(
                file.bytes(),
                &w.to_bytes()[..],
                "write_file and to_bytes agree"
            );
            let map = file.bytes();
            let g = file.parse().unwrap();
            let ctx = format!("v{version}, alignment {alignment:?}");

            assert_eq!(g.version, version, "{ctx}");
            let align = alignment.map_or(DEFAULT_ALIGNMENT, u64::from);
            assert_eq!(g.alignment, align, "{ctx}");
            assert_eq!(g.data_offset % align, 0, "{ctx}: data section aligned");
            assert_eq!(map.len() as u64 % align, 0, "{ctx}: file ends aligned");

            // Metadata: same keys in the same order, values bit-exact, all borrowed.
            let md = g.metadata();
            assert_eq!(md.len(), sample.metadata.len(), "{ctx}");
            for ((key, value), (k, want)) in md.iter().zip(&sample.metadata) {
                assert_eq!(key, k, "{ctx}");
                assert!(
                    same(value, want),
                    "{ctx}: '{k}': wrote {want:?}, read {value:?}"
                );
                assert!(
                    borrowed_from(key.as_bytes(), map),
                    "{ctx}: key '{key}' borrowed"
                );
                assert!(same(&g.get(key).unwrap(), want), "{ctx}: get('{key}')");
                match value {
                    Value::String(s) => assert!(borrowed_from(s, map), "'{key}' borrowed"),
                    Value::Array(a) => {
                        for item in a.iter() {
                            if let Value::String(s) = item {
                                assert!(borrowed_from(s, map), "'{key}' elements borrowed");
                            }
                        }
                    }
                    _ => {}
                }
            }
            assert_eq!(g.get("no.such.key"), None);

            // Tensors: names, types, dims, aligned offsets, data equal and borrowed.
            assert_eq!(g.tensors().len(), sample.tensors.len(), "{ctx}");
            for (t, want) in g.tensors().iter().zip(&sample.tensors) {
                let (name, data) = (&want.name, &want.data);
                assert_eq!(t.name, name, "{ctx}");
                assert_eq!((t.ty, &t.dims), (want.ty, &want.dims), "{ctx}: '{name}'");
                assert_eq!(g.tensor(name), Some(t), "{ctx}");
                assert_eq!(t.offset % align, 0, "{ctx}: '{name}' aligned");
                assert_eq!((g.data_offset + t.offset) % align, 0, "{ctx}: '{name}'");
                assert!((1..=4).contains(&t.dims.len()), "{ctx}: '{name}'");
                assert_eq!(t.bytes, data.len() as u64, "{ctx}: '{name}' size");
                let got = g.tensor_data(t);
                assert_eq!(got, &data[..], "{ctx}: '{name}' data");
                assert!(borrowed_from(got, map), "{ctx}: '{name}' data borrowed");
            }
        }
    }
}

/// The values of `all_values` come back exactly, in order, from a file of only them.
#[test]
fn every_value_type_round_trips_bitwise() {
    let mut rng = Rng::new(seed("every_value_type_round_trips_bitwise"));
    let values = common::all_values(&mut rng);
    for version in [2, 3] {
        let mut w = GgufWriter::new().version(version);
        for (k, v) in &values {
            w.add(k, v.clone()).unwrap();
        }
        let bytes = w.to_bytes();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.metadata().len(), values.len());
        let mut types_seen = std::collections::HashSet::new();
        for ((key, read), (k, want)) in g.metadata().iter().zip(&values) {
            assert_eq!(key, k);
            assert!(same(read, want), "'{k}': wrote {want:?}, read {read:?}");
            assert_eq!(read.value_type(), want.value_type());
            types_seen.insert(read.value_type());
            if let Value::Array(a) = read {
                types_seen.insert(a.elem);
            }
        }
        assert_eq!(types_seen.len(), 13, "all 13 value types covered");
        assert!(g.tensors().is_empty());
    }
}

/// A file laid out by hand from the spec reads as written, and our writer produces exactly
/// those bytes: the two agree with the format, not just with each other.
#[test]
fn hand_made_file_matches_reader_and_writer() {
    let mut rng = Rng::new(seed("hand_made_file_matches_reader_and_writer"));
    for version in [2, 3] {
        let x: u32 = rng.next_u64() as u32;
        let q8 = GgmlType::from_name("Q8_0").unwrap();
        let a = random_bytes(&mut rng, 64 * 3 / 32 * 34);
        let b = random_bytes(&mut rng, 5 * 2);
        let mut raw = Raw::header(version, 2, 3);
        raw.key("general.name", 8).str("hand ✓");
        raw.key("x", 4).u32(x);
        raw.key("list", 9).u32(8).u64(2).str("").str("ab");
        raw.tensor("a", &[64, 3], 8, 0);
        raw.tensor("b", &[5], 30, 224); // 204 bytes of `a`, padded to 224
        raw.pad(32).bytes(&a).pad(32).bytes(&b).pad(32);
        let g = Gguf::parse(&raw.0).unwrap();
        assert_eq!(g.version, version);
        assert_eq!(g.get("general.name").unwrap().as_str(), Some("hand ✓"));
        assert_eq!(g.get("x"), Some(Value::U32(x)));
        let list: Vec<_> = g.get("list").unwrap().as_array().unwrap().iter().collect();
        assert_eq!(list, [Value::String(b""), Value::String(b"ab")]);
        let (ta, tb) = (&g.tensors()[0], &g.tensors()[1]);
        assert_eq!(
            (ta.ty.name, &ta.dims[..], ta.offset),
            ("Q8_0", &[64, 3][..], 0)
        );
        assert_eq!(
            (tb.ty.name, &tb.dims[..], tb.offset),
            ("BF16", &[5][..], 224)
        );
        assert_eq!(g.tensor_data(ta), &a[..]);
        assert_eq!(g.tensor_data(tb), &b[..]);

        let mut w = GgufWriter::new().version(version);
        w.add("general.name", "hand ✓").unwrap();
        w.add("x", x).unwrap();
        w.add("list", MetaValue::strings(["", "ab"])).unwrap();
        w.add_tensor("a", q8, &[64, 3], a.clone()).unwrap();
        let bf16 = GgmlType::from_name("bf16").unwrap();
        w.add_tensor("b", bf16, &[5], b.clone()).unwrap();
        assert_eq!(w.to_bytes(), raw.0, "writer bytes are the spec's");
    }
}

/// Every ggml type id 0..=42 against ggml-common.h: each block size written as the sum of its
/// struct's fields (ggml_half = 2 bytes, QK_K = 256), so a wrong table entry cannot hide.
#[test]
fn type_table_matches_ggml_block_structs() {
    const H: u64 = 2; // ggml_half
    const QK_K: u64 = 256;
    let live: &[(u32, &str, u64, u64)] = &[
        (0, "F32", 1, 4),
        (1, "F16", 1, 2),
        (2, "Q4_0", 32, H + 32 / 2),
        (3, "Q4_1", 32, 2 * H + 32 / 2),
        (6, "Q5_0", 32, H + 4 + 32 / 2),
        (7, "Q5_1", 32, 2 * H + 4 + 32 / 2),
        (8, "Q8_0", 32, H + 32),
        (9, "Q8_1", 32, 2 * H + 32),
        (10, "Q2_K", QK_K, QK_K / 16 + QK_K / 4 + 2 * H),
        (11, "Q3_K", QK_K, QK_K / 8 + QK_K / 4 + 12 + H),
        (12, "Q4_K", QK_K, 2 * H + 12 + QK_K / 2),
        (13, "Q5_K", QK_K, 2 * H + 12 + QK_K / 8 + QK_K / 2),
        (14, "Q6_K", QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + H),
        (15, "Q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2),
        (16, "IQ2_XXS", QK_K, H + QK_K / 8 * 2),
        (17, "IQ2_XS", QK_K, H + QK_K / 8 * 2 + QK_K / 32),
        (18, "IQ3_XXS", QK_K, H + 3 * QK_K / 8),
        (19, "IQ1_S", QK_K, H + QK_K / 8 + QK_K / 32 * 2),
        (20, "IQ4_NL", 32, H + 32 / 2),
        (
            21,
            "IQ3_S",
            QK_K,
            H + QK_K / 4 + QK_K / 32 + QK_K / 8 + QK_K / 64,
        ),
        (22, "IQ2_S", QK_K, H + QK_K / 4 + QK_K / 32 + QK_K / 32),
        (23, "IQ4_XS", QK_K, H + 2 + QK_K / 64 + QK_K / 2),
        (24, "I8", 1, 1),
        (25, "I16", 1, 2),
        (26, "I32", 1, 4),
        (27, "I64", 1, 8),
        (28, "F64", 1, 8),
        (29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
        (30, "BF16", 1, 2),
        (
            34,
            "TQ1_0",
            QK_K,
            (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + H,
        ),
        (35, "TQ2_0", QK_K, QK_K / 4 + H),
        (39, "MXFP4", 32, 1 + 32 / 2),
        (40, "NVFP4", 64, 64 / 16 + 64 / 2),
        (41, "Q1_0", 128, H + 128 / 8),
        (42, "Q2_0", 64, H + 64 / 4),
    ];
    let retired: &[(u32, &str)] = &[
        (4, "Q4_2"),
        (5, "Q4_3"),
        (31, "Q4_0_4_4"),
        (32, "Q4_0_4_8"),
        (33, "Q4_0_8_8"),
        (36, "IQ4_NL_4_4"),
        (37, "IQ4_NL_4_8"),
        (38, "IQ4_NL_8_8"),
    ];
    assert_eq!(GGML_TYPES.len(), 43);
    assert_eq!(live.len() + retired.len(), 43);
    for &(id, name, block, bytes) in live {
        let t = GgmlType::from_id(id).unwrap();
        assert_eq!((t.id, t.name, t.block, t.bytes), (id, name, block, bytes));
        assert!(!t.is_retired());
        assert_eq!(GgmlType::from_name(&name.to_lowercase()), Some(t));
    }
    for &(id, name) in retired {
        let t = GgmlType::from_id(id).unwrap();
        assert_eq!((t.id, t.name), (id, name));
        assert!(t.is_retired(), "{name}");
        assert_eq!(GgmlType::from_name(name), None, "{name} is not offered");
    }
    for (i, t) in GGML_TYPES.iter().enumerate() {
        assert_eq!(t.id as usize, i, "the table is indexed by id");
    }
    assert_eq!(GgmlType::from_id(43), None);
    assert_eq!(GgmlType::from_id(u32::MAX), None);
    // The figures the issue names.
    for (name, block, bytes) in [
        ("BF16", 1, 2),
        ("TQ1_0", 256, 54),
        ("TQ2_0", 256, 66),
        ("MXFP4", 32, 17),
        ("NVFP4", 64, 36),
        ("Q1_0", 128, 18),
        ("Q2_0", 64, 18),
    ] {
        let t = GgmlType::from_name(name).unwrap();
        assert_eq!((t.block, t.bytes), (block, bytes), "{name}");
    }
}

/// Tensor sizes from the table equal the exact (u128) size, and overflow is an error.
#[test]
fn tensor_sizes_use_checked_arithmetic() {
    let mut rng = Rng::new(seed("tensor_sizes_use_checked_arithmetic"));
    for t in GGML_TYPES.iter().filter(|t| !t.is_retired()) {
        for _ in 0..50 {
            let ne0 = t.block * (rng.next_u64() % (1 << 20));
            let rest = 1 + rng.next_u64() % (1 << 40);
            let n = ne0 as u128 * rest as u128;
            let exact = n / t.block as u128 * t.bytes as u128;
            let got = t.tensor_bytes(ne0, n.min(u64::MAX as u128) as u64);
            if n <= u64::MAX as u128 && exact <= u64::MAX as u128 {
                assert_eq!(got, Some(exact as u64), "{} ne0 {ne0} n {n}", t.name);
            } else if n <= u64::MAX as u128 {
                assert_eq!(got, None, "{} ne0 {ne0} n {n}", t.name);
            }
            if t.block > 1 {
                let partial = ne0 + 1 + rng.below(t.block as usize - 1) as u64;
                assert_eq!(t.tensor_bytes(partial, partial), None, "{}", t.name);
            }
        }
        // The largest element count ggml allows, in the widest type: bytes overflow u64.
        assert_eq!(
            t.tensor_bytes(0, u64::MAX / t.block * t.block).is_some(),
            t.bytes <= t.block
        );
    }
    // The writer refuses what the reader would refuse.
    let f64t = GgmlType::from_name("F64").unwrap();
    let mut w = GgufWriter::new();
    let e = w.add_tensor_zeros("huge", f64t, &[1 << 62, 1]).unwrap_err();
    assert!(matches!(e, GgufError::DimsOverflow { .. }), "{e}");
    let e = w
        .add_tensor_zeros("wide", f64t, &[1 << 32, 1 << 32])
        .unwrap_err();
    assert!(matches!(e, GgufError::DimsOverflow { .. }), "{e}");
    let q8 = GgmlType::from_name("Q8_0").unwrap();
    let e = w.add_tensor_zeros("part", q8, &[33]).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::PartialBlock {
                ne0: 33,
                block: 32,
                ..
            }
        ),
        "{e}"
    );
    let e = w.add_tensor("short", q8, &[32], vec![0; 33]).unwrap_err();
    assert!(e.to_string().contains("short"), "{e}");
    let e = w
        .add_tensor_zeros("five", q8, &[32, 1, 1, 1, 1])
        .unwrap_err();
    assert!(matches!(e, GgufError::TooManyDims { n_dims: 5, .. }), "{e}");
    let e = w
        .add_tensor_zeros("old", GgmlType::from_id(4).unwrap(), &[32])
        .unwrap_err();
    assert!(matches!(e, GgufError::RetiredTensorType { .. }), "{e}");
}

/// `Value::as_int` takes every integer width, and so does `general.alignment`, which real
/// files do not always store as the spec's u32.
#[test]
fn integers_accepted_in_any_integer_type() {
    let mut rng = Rng::new(seed("integers_accepted_in_any_integer_type"));
    let r = rng.next_u64();
    let cases: Vec<(Value<'_>, Option<i128>)> = vec![
        (Value::U8(r as u8), Some((r as u8).into())),
        (Value::I8(r as i8), Some((r as i8).into())),
        (Value::U16(r as u16), Some((r as u16).into())),
        (Value::I16(r as i16), Some((r as i16).into())),
        (Value::U32(r as u32), Some((r as u32).into())),
        (Value::I32(r as i32), Some((r as i32).into())),
        (Value::U64(u64::MAX), Some(u64::MAX.into())),
        (Value::I64(i64::MIN), Some(i64::MIN.into())),
        (Value::F32(1.0), None),
        (Value::F64(1.0), None),
        (Value::Bool(true), None),
        (Value::String(b"1"), None),
    ];
    for (v, want) in cases {
        assert_eq!(v.as_int(), want, "{v:?}");
    }
    // general.alignment of 64 in each integer type; the F32 tensor at offset 64 is aligned.
    for (ty, value) in [
        (0u32, vec![64u8]),
        (1, vec![64]),
        (2, 64u16.to_le_bytes().to_vec()),
        (3, 64i16.to_le_bytes().to_vec()),
        (4, 64u32.to_le_bytes().to_vec()),
        (5, 64i32.to_le_bytes().to_vec()),
        (10, 64u64.to_le_bytes().to_vec()),
        (11, 64i64.to_le_bytes().to_vec()),
    ] {
        let mut raw = Raw::header(3, 2, 1);
        raw.key("general.alignment", ty).bytes(&value);
        raw.tensor("a", &[4], 0, 0).tensor("b", &[4], 0, 64);
        raw.pad(64).zeros(128);
        let g = Gguf::parse(&raw.0).unwrap_or_else(|e| panic!("type {ty}: {e}"));
        assert_eq!(g.alignment, 64, "type {ty}");
        assert_eq!(g.data_offset % 64, 0);
    }
}

/// A zero tensor declared with `add_tensor_zeros` costs no disk: the file is sparse, reads
/// back as zeros, and holds the same bytes as the in-memory writer produces.
#[test]
fn zero_tensors_are_written_sparsely() {
    let f32t = GgmlType::from_name("F32").unwrap();
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama").unwrap();
    w.add_tensor("small", f32t, &[3], vec![1; 12]).unwrap();
    w.add_tensor_zeros("big", f32t, &[1 << 20, 4]).unwrap(); // 16 MiB
    w.add_tensor("tail", f32t, &[5], vec![2; 20]).unwrap();
    w.add_tensor_zeros("end", f32t, &[1 << 18]).unwrap(); // a hole at the end of the file
    let tmp = TempPath::new("sparse.gguf");
    w.write_file(&tmp.0).unwrap();
    let file = GgufFile::open(&tmp.0).unwrap();
    let g = file.parse().unwrap();
    let big = g.tensor("big").unwrap();
    assert_eq!(big.bytes, 16 << 20);
    assert!(g.tensor_data(big).iter().all(|&b| b == 0));
    assert!(
        g.tensor_data(g.tensor("end").unwrap())
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(g.tensor_data(g.tensor("small").unwrap()), &[1; 12]);
    assert_eq!(g.tensor_data(g.tensor("tail").unwrap()), &[2; 20]);
    assert_eq!(file.bytes(), &w.to_bytes()[..]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&tmp.0).unwrap();
        // Filesystems without holes would allocate all 17 MiB.
        println!(
            "sparse file: {} bytes, {} allocated",
            meta.len(),
            meta.blocks() * 512
        );
        assert!(meta.blocks() * 512 < 4 << 20, "file is sparse");
    }
}

// ---------------------------------------------------------------------------------------
// Validation: one hand-made file per rule, each a small edit of a good one.

/// A small valid file, as parts that each error case edits.
struct Spec {
    version: u32,
    n_kv: Option<u64>,
    n_tensors: Option<u64>,
    /// Key and raw bytes of type id and value.
    kvs: Vec<(Vec<u8>, Raw)>,
    /// Name, dims, type id, offset.
    tensors: Vec<(Vec<u8>, Vec<u64>, u32, u64)>,
    data_len: usize,
}

impl Spec {
    fn good() -> Spec {
        let mut s = Spec {
            version: 3,
            n_kv: None,
            n_tensors: None,
            kvs: vec![],
            tensors: vec![],
            data_len: 128,
        };
        s.kv("general.architecture", |r| r.u32(8).str("llama"));
        s.kv("a.u32", |r| r.u32(4).u32(7));
        s.kv("a.arr", |r| r.u32(9).u32(8).u64(2).str("x").str("yz"));
        s.kv("a.flag", |r| r.u32(7).bytes(&[1]));
        s.tensors.push((b"t0".to_vec(), vec![8], 0, 0));
        s.tensors.push((b"t1".to_vec(), vec![32, 2], 8, 32));
        s
    }

    fn kv(&mut self, key: &str, value: impl FnOnce(&mut Raw) -> &mut Raw) {
        let mut r = Raw::default();
        value(&mut r);
        self.kvs.push((key.as_bytes().to_vec(), r));
    }

    fn set(&mut self, key: &str, value: impl FnOnce(&mut Raw) -> &mut Raw) {
        let i = self
            .kvs
            .iter()
            .position(|(k, _)| k == key.as_bytes())
            .unwrap();
        let mut r = Raw::default();
        value(&mut r);
        self.kvs[i].1 = r;
    }

    fn build(&self) -> Vec<u8> {
        let mut r = Raw::header(
            self.version,
            self.n_tensors.unwrap_or(self.tensors.len() as u64),
            self.n_kv.unwrap_or(self.kvs.len() as u64),
        );
        for (k, v) in &self.kvs {
            r.str(k).bytes(&v.0);
        }
        for (name, dims, ty, offset) in &self.tensors {
            r.str(name).u32(dims.len() as u32);
            dims.iter().for_each(|&d| {
                r.u64(d);
            });
            r.u32(*ty).u64(*offset);
        }
        r.pad(32).zeros(self.data_len);
        r.0
    }
}

fn parse_err(bytes: &[u8]) -> GgufError {
    match Gguf::parse(bytes) {
        Ok(_) => panic!("parsed a bad file"),
        Err(e) => e,
    }
}

/// Parse `spec`, expect an error matching `is`, whose message names every one of `names`.
fn expect(spec: &Spec, is: impl Fn(&GgufError) -> bool, names: &[&str]) -> GgufError {
    let e = parse_err(&spec.build());
    assert!(is(e.kind()), "unexpected error: {e:?}");
    let msg = e.to_string();
    for name in names {
        assert!(msg.contains(name), "message {msg:?} should name {name}");
    }
    e
}

#[test]
fn good_spec_parses() {
    let bytes = Spec::good().build();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.metadata().len(), 4);
    assert_eq!(g.tensors().len(), 2);
    assert_eq!(g.get("a.flag"), Some(Value::Bool(true)));
    assert_eq!(g.tensor("t1").unwrap().bytes, 68);
}

#[test]
fn bad_magic_and_version() {
    let mut bytes = Spec::good().build();
    bytes[..4].copy_from_slice(b"GGML");
    assert_eq!(parse_err(&bytes), GgufError::BadMagic(*b"GGML"));
    for v in [0u32, 1, 4, u32::MAX] {
        let mut s = Spec::good();
        s.version = v;
        let e = expect(&s, |e| matches!(e, GgufError::UnsupportedVersion(_)), &[]);
        assert_eq!(e, GgufError::UnsupportedVersion(v));
        assert!(!e.to_string().contains("byte-swapped"), "{e}");
    }
    let mut s = Spec::good();
    s.version = 3u32.swap_bytes();
    let e = expect(&s, |e| matches!(e, GgufError::UnsupportedVersion(_)), &[]);
    assert!(e.to_string().contains("byte-swapped"), "{e}");
    assert!(matches!(parse_err(b"GGU"), GgufError::Truncated { .. }));
    assert!(matches!(parse_err(b""), GgufError::Truncated { .. }));
}

#[test]
fn truncated_values_name_their_key() {
    let good = Spec::good().build();
    // Cut inside the value of a.u32: after its key and type, two of its four bytes.
    let at = good.windows(5).position(|w| w == b"a.u32").unwrap() + 5 + 4 + 2;
    let e = parse_err(&good[..at]);
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                need: 4,
                have: 2,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("'a.u32'"), "{e}");

    // A string and an array longer than what is left.
    let mut s = Spec::good();
    s.set("general.architecture", |r| {
        r.u32(8).u64(1 << 40).bytes(b"llama")
    });
    expect(
        &s,
        |e| matches!(e, GgufError::Truncated { need, .. } if *need == 1 << 40),
        &["'general.architecture'"],
    );
    let mut s = Spec::good();
    s.set("a.arr", |r| r.u32(9).u32(8).u64(1 << 40).str("x"));
    expect(
        &s,
        |e| matches!(e, GgufError::Truncated { .. }),
        &["'a.arr'"],
    );
    let mut s = Spec::good();
    s.set("a.arr", |r| r.u32(9).u32(4).u64(1 << 40).u32(1));
    expect(
        &s,
        |e| matches!(e, GgufError::Truncated { .. }),
        &["'a.arr'"],
    );
    // An element string longer than what is left.
    let mut s = Spec::good();
    s.set("a.arr", |r| r.u32(9).u32(8).u64(2).str("x").u64(1 << 40));
    expect(
        &s,
        |e| matches!(e, GgufError::Truncated { .. }),
        &["element 1", "'a.arr'"],
    );
    // A key longer than what is left.
    let mut s = Spec::good();
    s.kvs[1].0 = vec![];
    let mut bytes = s.build();
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap() + 5;
    bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = parse_err(&bytes);
    assert!(e.to_string().contains("key of metadata entry 1"), "{e}");
    // Counts larger than the file holds.
    let mut s = Spec::good();
    s.n_kv = Some(5);
    expect(&s, |e| matches!(e, GgufError::Truncated { .. }), &[]);
}

#[test]
fn unknown_value_types_and_bad_values() {
    let mut s = Spec::good();
    s.set("a.u32", |r| r.u32(13).u32(7));
    expect(
        &s,
        |e| matches!(e, GgufError::UnknownValueType { id: 13, .. }),
        &["'a.u32'"],
    );
    let mut s = Spec::good();
    s.set("a.arr", |r| r.u32(9).u32(u32::MAX).u64(0));
    expect(
        &s,
        |e| matches!(e, GgufError::UnknownValueType { id: u32::MAX, .. }),
        &["'a.arr'"],
    );
    let mut s = Spec::good();
    s.set("a.arr", |r| r.u32(9).u32(9).u64(0));
    expect(
        &s,
        |e| *e == GgufError::NestedArray("a.arr".into()),
        &["'a.arr'"],
    );
    let mut s = Spec::good();
    s.set("a.flag", |r| r.u32(7).bytes(&[2]));
    expect(
        &s,
        |e| matches!(e, GgufError::BadBool { byte: 2, .. }),
        &["'a.flag'"],
    );
    let mut s = Spec::good();
    s.set("a.flag", |r| r.u32(9).u32(7).u64(3).bytes(&[0, 1, 0xff]));
    expect(
        &s,
        |e| matches!(e, GgufError::BadBool { byte: 0xff, .. }),
        &["element 2", "'a.flag'"],
    );
    let mut s = Spec::good();
    s.kvs[1].0 = b"bad\xffkey".to_vec();
    expect(
        &s,
        |e| matches!(e, GgufError::BadString(_)),
        &["metadata entry 1"],
    );
    // Metadata strings may hold any bytes (real vocabularies do); only keys must be UTF-8.
    let mut s = Spec::good();
    s.set("general.architecture", |r| r.u32(8).str(b"\xff\xfe"));
    let bytes = s.build();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(
        g.get("general.architecture"),
        Some(Value::String(b"\xff\xfe"))
    );
    assert_eq!(g.get("general.architecture").unwrap().as_str(), None);
}

#[test]
fn duplicate_keys_and_tensors() {
    let mut s = Spec::good();
    s.kv("a.u32", |r| r.u32(0).bytes(&[1]));
    expect(
        &s,
        |e| *e == GgufError::DuplicateKey("a.u32".into()),
        &["'a.u32'"],
    );
    let mut s = Spec::good();
    s.tensors[1].0 = b"t0".to_vec();
    expect(
        &s,
        |e| *e == GgufError::DuplicateTensor("t0".into()),
        &["'t0'"],
    );
    let mut w = GgufWriter::new();
    w.add("k", 1u8).unwrap();
    assert_eq!(
        w.add("k", 2u8).unwrap_err(),
        GgufError::DuplicateKey("k".into())
    );
    let f32t = GgmlType::from_name("F32").unwrap();
    w.add_tensor("t", f32t, &[1], vec![0; 4]).unwrap();
    assert_eq!(
        w.add_tensor("t", f32t, &[1], vec![0; 4]).unwrap_err(),
        GgufError::DuplicateTensor("t".into())
    );
}

#[test]
fn bad_tensor_infos_name_the_tensor() {
    let mut s = Spec::good();
    s.tensors[1].1 = vec![32, 1, 1, 1, 1];
    expect(
        &s,
        |e| matches!(e, GgufError::TooManyDims { n_dims: 5, .. }),
        &["'t1'"],
    );
    let mut s = Spec::good();
    s.tensors[1].1 = vec![];
    let mut bytes = s.build();
    let at = bytes.windows(2).rposition(|w| w == b"t1").unwrap() + 2;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = parse_err(&bytes);
    assert!(
        matches!(
            e,
            GgufError::TooManyDims {
                n_dims: u32::MAX,
                ..
            }
        ),
        "{e:?}"
    );

    for dims in [
        vec![1 << 32, 1 << 32],
        vec![0, u64::MAX],
        vec![u64::MAX],
        vec![1 << 62, 2],
        vec![2, 2, 1 << 61, 1 << 61],
    ] {
        let mut s = Spec::good();
        s.tensors[0].1 = dims.clone();
        expect(
            &s,
            |e| matches!(e, GgufError::DimsOverflow { .. }),
            &["'t0'"],
        );
    }
    // Elements fit in int64_t but bytes overflow u64.
    let mut s = Spec::good();
    s.tensors[0] = (b"t0".to_vec(), vec![1 << 62], 28, 0);
    expect(
        &s,
        |e| matches!(e, GgufError::DimsOverflow { .. }),
        &["'t0'"],
    );

    for id in [43, 1000, u32::MAX] {
        let mut s = Spec::good();
        s.tensors[1].2 = id;
        expect(
            &s,
            |e| matches!(e, GgufError::UnknownTensorType { id: i, .. } if *i == id),
            &["'t1'"],
        );
    }
    for id in [4, 5, 31, 32, 33, 36, 37, 38] {
        let mut s = Spec::good();
        s.tensors[1].2 = id;
        expect(
            &s,
            |e| matches!(e, GgufError::RetiredTensorType { .. }),
            &["'t1'"],
        );
    }
    let mut s = Spec::good();
    s.tensors[1].1 = vec![33, 2];
    expect(
        &s,
        |e| {
            matches!(
                e,
                GgufError::PartialBlock {
                    ne0: 33,
                    block: 32,
                    ..
                }
            )
        },
        &["'t1'"],
    );
    let mut s = Spec::good();
    s.tensors[1].0 = b"t\xc3".to_vec();
    expect(&s, |e| matches!(e, GgufError::BadString(_)), &["tensor 1"]);
}

#[test]
fn tensor_layout_errors() {
    let mut s = Spec::good();
    s.tensors[1].3 = 16;
    expect(
        &s,
        |e| {
            matches!(
                e,
                GgufError::Misaligned {
                    offset: 16,
                    alignment: 32,
                    ..
                }
            )
        },
        &["'t1'"],
    );
    // t1 is 68 bytes at 32, so the data section needs 100 bytes.
    let mut s = Spec::good();
    s.data_len = 100;
    assert!(Gguf::parse(&s.build()).is_ok());
    s.data_len = 99;
    expect(
        &s,
        |e| matches!(e, GgufError::TensorOutOfBounds { data_len: 99, .. }),
        &["'t1'"],
    );
    for offset in [96, 1 << 40, u64::MAX - 31] {
        let mut s = Spec::good();
        s.tensors[1].3 = offset;
        expect(
            &s,
            |e| matches!(e, GgufError::TensorOutOfBounds { .. }),
            &["'t1'"],
        );
    }
    let mut s = Spec::good();
    s.tensors[1].3 = 0;
    expect(
        &s,
        |e| matches!(e, GgufError::Overlap(..)),
        &["'t0'", "'t1'"],
    );
    // Empty tensors overlap nothing, in either order (gguf-py gives them the next offset).
    for empty_first in [true, false] {
        let mut s = Spec::good();
        let empty = (b"empty".to_vec(), vec![0, 4], 0, 32);
        s.tensors.insert(if empty_first { 1 } else { 2 }, empty);
        let bytes = s.build();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.tensor_data(g.tensor("empty").unwrap()), b"");
    }
}

#[test]
fn bad_alignment() {
    for (ty, value) in [
        (4u32, 0u32.to_le_bytes().to_vec()),
        (4, 3u32.to_le_bytes().to_vec()),
        (4, 96u32.to_le_bytes().to_vec()),
        (10, (1u64 << 32).to_le_bytes().to_vec()),
        (11, (-32i64).to_le_bytes().to_vec()),
        (7, vec![1]),
        (6, 32f32.to_le_bytes().to_vec()),
        (8, [&2u64.to_le_bytes()[..], b"32"].concat()),
    ] {
        let mut s = Spec::good();
        s.kv("general.alignment", |r| r.u32(ty).bytes(&value));
        expect(
            &s,
            |e| matches!(e, GgufError::BadAlignment(_)),
            &["general.alignment"],
        );
    }
    let mut w = GgufWriter::new();
    for bad in [MetaValue::U32(0), MetaValue::U32(48), MetaValue::U64(64)] {
        let e = w.add("general.alignment", bad).unwrap_err();
        assert!(matches!(e, GgufError::BadAlignment(_)), "{e}");
    }
    // The largest alignment the spec's u32 holds: written (sparsely) and read back.
    let mut w = GgufWriter::new();
    w.add("general.alignment", 1u32 << 31).unwrap();
    let f32t = GgmlType::from_name("F32").unwrap();
    w.add_tensor("t", f32t, &[1], 1f32.to_le_bytes().to_vec())
        .unwrap();
    let tmp = TempPath::new("align31.gguf");
    w.write_file(&tmp.0).unwrap();
    let file = GgufFile::open(&tmp.0).unwrap();
    let g = file.parse().unwrap();
    assert_eq!((g.alignment, g.data_offset), (1 << 31, 1 << 31));
    assert_eq!(g.tensor_data(&g.tensors()[0]), 1f32.to_le_bytes());
    assert_eq!(file.bytes().len(), 1 << 32, "ends aligned");
}

/// The data section must start inside the file when there are tensors, even empty ones:
/// cutting the header's padding used to parse and then panic in `tensor_data`.
#[test]
fn truncated_padding_before_data() {
    let mut s = Spec::good();
    s.tensors = vec![(b"empty".to_vec(), vec![0], 0, 0)];
    s.data_len = 0;
    let bytes = s.build();
    let header_end = bytes.windows(5).position(|w| w == b"empty").unwrap() + 5 + 4 + 8 + 4 + 8;
    assert!(header_end < bytes.len(), "the sample has padding to cut");
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.tensor_data(&g.tensors()[0]), b"");
    let e = parse_err(&bytes[..header_end]);
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    // Without tensors there is no data section to find: the padding is optional.
    let mut s = Spec::good();
    s.tensors.clear();
    s.data_len = 0;
    let bytes = s.build();
    // a.flag is last: its type id (7), then its one-byte value.
    let header_end = bytes.windows(4).rposition(|w| w == [7, 0, 0, 0]).unwrap() + 5;
    assert!(header_end < bytes.len(), "the sample has padding to cut");
    assert!(Gguf::parse(&bytes[..header_end]).is_ok());
    assert!(Gguf::parse(&bytes[..header_end - 1]).is_err());
}

#[test]
fn file_errors_name_the_file() {
    let tmp = TempPath::new("bad.gguf");
    let mut s = Spec::good();
    s.tensors[1].3 = 0;
    std::fs::write(&tmp.0, s.build()).unwrap();
    let file = GgufFile::open(&tmp.0).unwrap();
    let e = match file.parse() {
        Err(kvbits::Error::Gguf(e)) => e,
        other => panic!("{other:?}"),
    };
    assert!(matches!(e, GgufError::InFile { .. }));
    assert!(matches!(e.kind(), GgufError::Overlap(..)));
    assert!(
        e.to_string().starts_with(&tmp.0.display().to_string()),
        "{e}"
    );
    // An empty file is a truncated one, not an mmap error.
    std::fs::write(&tmp.0, b"").unwrap();
    let file = GgufFile::open(&tmp.0).unwrap();
    match file.parse() {
        Err(kvbits::Error::Gguf(e)) => assert!(matches!(e.kind(), GgufError::Truncated { .. })),
        other => panic!("{other:?}"),
    }
    let missing = TempPath::new("missing.gguf");
    assert!(matches!(
        GgufFile::open(&missing.0),
        Err(kvbits::Error::Io { .. })
    ));
}

/// Tensors of every live type and 1-4 dims, random sizes: the reader's byte count is the
/// table's, and data lands where the offsets say.
#[test]
fn random_tensor_layouts() {
    let mut rng = Rng::new(seed("random_tensor_layouts"));
    for _ in 0..20 {
        let mut w = GgufWriter::new();
        let align = 1u32 << rng.below(8);
        w.add("general.alignment", align).unwrap();
        let mut want = vec![];
        for i in 0..1 + rng.below(8) {
            let ty = loop {
                let t = &GGML_TYPES[rng.below(GGML_TYPES.len())];
                if !t.is_retired() {
                    break t;
                }
            };
            let n_dims = 1 + rng.below(4);
            let dims = random_dims(&mut rng, ty, n_dims);
            let n: u64 = dims.iter().product();
            let data = random_bytes(&mut rng, (n / ty.block * ty.bytes) as usize);
            w.add_tensor(&format!("t{i}"), ty, &dims, data.clone())
                .unwrap();
            want.push((ty.id, dims, data));
        }
        let bytes = w.to_bytes();
        let g = Gguf::parse(&bytes).unwrap();
        let mut end = 0;
        for (t, (id, dims, data)) in g.tensors().iter().zip(&want) {
            assert_eq!(
                (t.ty.id, &t.dims, t.n_elements()),
                (*id, dims, dims.iter().product())
            );
            assert_eq!(t.offset % align as u64, 0);
            assert!(t.offset >= end, "in file order, no overlap");
            end = t.offset + t.bytes;
            assert_eq!(g.tensor_data(t), &data[..]);
        }
        assert_eq!(
            g.metadata()[0].1.value_type(),
            ValueType::U32,
            "alignment stored as u32"
        );
    }
}
