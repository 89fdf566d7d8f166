//! Helpers shared by the tests (and the fuzz target's corpus seeds): replayable seeds, the GPU
//! stream GPU tests skip without, sample GGUF files from our writer, a builder for hand-made
//! bytes, and a walk over everything a parsed file exposes.
#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;

use kvbits::gguf::{GgmlType, Gguf, GgufWriter, MetaValue, Value, ValueType};
use kvbits::rng::Rng;

/// A fresh seed, printed so a failure can be replayed with `KVBITS_SEED`.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("KVBITS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(Rng::fresh_seed);
    println!("{test}: seed {seed} (replay with KVBITS_SEED={seed})");
    seed
}

/// A stream on the current GPU, or `None` with a message where there is none (GPU tests
/// skip there).
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<kvbits::cuda::Stream> {
    if kvbits::cuda::device_count() == 0 {
        eprintln!("no CUDA device: skipping GPU test");
        return None;
    }
    Some(kvbits::cuda::Stream::new().expect("stream"))
}

/// A file path in the temp dir, unique to this process and tag, removed on drop.
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(tag: &str) -> TempPath {
        let name = format!("kvbits-{}-{}-{tag}", std::process::id(), Rng::fresh_seed());
        TempPath(std::env::temp_dir().join(name))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn random_string(rng: &mut Rng, n: usize) -> String {
    const CHARS: &[char] = &['a', 'Z', '0', ' ', '.', 'é', 'ß', '日', '🦀', '\0', '\n'];
    (0..n).map(|_| CHARS[rng.below(CHARS.len())]).collect()
}

/// Every value type at its extremes (0, MIN, MAX; NaN payloads, infinities, -0.0 and
/// subnormals for floats; empty and non-ASCII strings), plus random values, and an array of
/// every element type, empty ones included.
pub fn all_values(rng: &mut Rng) -> Vec<(String, MetaValue)> {
    use MetaValue as M;
    let r = rng.next_u64();
    let ints: Vec<MetaValue> = vec![
        M::U8(0),
        M::U8(u8::MAX),
        M::U8(r as u8),
        M::I8(i8::MIN),
        M::I8(i8::MAX),
        M::I8(0),
        M::U16(0),
        M::U16(u16::MAX),
        M::U16(r as u16),
        M::I16(i16::MIN),
        M::I16(i16::MAX),
        M::I16(-1),
        M::U32(0),
        M::U32(u32::MAX),
        M::U32(r as u32),
        M::I32(i32::MIN),
        M::I32(i32::MAX),
        M::I32(r as i32),
        M::U64(0),
        M::U64(u64::MAX),
        M::U64(r),
        M::I64(i64::MIN),
        M::I64(i64::MAX),
        M::I64(r as i64),
    ];
    let f32s: Vec<f32> = [
        0x0000_0000,
        0x8000_0000, // -0.0
        0x0000_0001, // smallest subnormal
        0x7f7f_ffff, // MAX
        0xff7f_ffff, // MIN
        0x7f80_0000, // inf
        0xff80_0000,
        0x7fa0_1234, // signalling NaN with a payload
        0xffc0_0001, // negative quiet NaN with a payload
        rng.next_u64() as u32,
    ]
    .map(f32::from_bits)
    .into();
    let f64s: Vec<f64> = [
        0,
        0x8000_0000_0000_0000,
        1,
        0x7fef_ffff_ffff_ffff,
        0xffef_ffff_ffff_ffff,
        0x7ff0_0000_0000_0000,
        0xfff0_0000_0000_0000,
        0x7ff0_0000_dead_beef,
        0xfff8_0000_0000_0001,
        rng.next_u64(),
    ]
    .map(f64::from_bits)
    .into();
    let n = 1 + rng.below(40);
    let strings: Vec<String> = vec![
        String::new(),
        "llama".into(),
        "ünïcødé ✓ 日本語 🦀".into(),
        random_string(rng, n),
    ];

    let mut out: Vec<(String, MetaValue)> = vec![];
    for (i, v) in ints.iter().enumerate() {
        out.push((format!("test.{}.{i}", v.value_type()), v.clone()));
    }
    for (i, &v) in f32s.iter().enumerate() {
        out.push((format!("test.float32.{i}"), M::F32(v)));
    }
    for (i, &v) in f64s.iter().enumerate() {
        out.push((format!("test.float64.{i}"), M::F64(v)));
    }
    out.push(("test.bool.true".into(), M::Bool(true)));
    out.push(("test.bool.false".into(), M::Bool(false)));
    for (i, s) in strings.iter().enumerate() {
        out.push((format!("test.string.{i}"), M::String(s.clone())));
    }
    // Arrays of every element type but arrays, each also empty.
    let mut arrays: Vec<(ValueType, Vec<MetaValue>)> = vec![];
    for elem in [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::U64,
        ValueType::I64,
    ] {
        let items = ints.iter().filter(|v| v.value_type() == elem).cloned();
        arrays.push((elem, items.collect()));
    }
    arrays.push((ValueType::F32, f32s.iter().map(|&v| M::F32(v)).collect()));
    arrays.push((ValueType::F64, f64s.iter().map(|&v| M::F64(v)).collect()));
    arrays.push((
        ValueType::Bool,
        (0..1 + rng.below(20))
            .map(|_| M::Bool(rng.below(2) == 1))
            .collect(),
    ));
    arrays.push((
        ValueType::String,
        strings.iter().map(|s| M::String(s.clone())).collect(),
    ));
    for (elem, items) in arrays {
        out.push((format!("test.array.{elem}"), M::Array(elem, items)));
        out.push((format!("test.array.{elem}.empty"), M::Array(elem, vec![])));
    }
    out
}

/// The tensor types the round trips cover, with 1 to 4 dims each.
pub const TENSOR_TYPES: &[&str] = &[
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "IQ4_XS", "TQ1_0", "MXFP4", "Q1_0",
    "Q2_0", "I8", "I16", "I32", "I64", "F64",
];

/// Random dims for `ty`: 1 to 4 of them, ne[0] whole blocks, a few hundred bytes at most.
pub fn random_dims(rng: &mut Rng, ty: &GgmlType, n_dims: usize) -> Vec<u64> {
    let mut dims = vec![ty.block * (1 + rng.below(2) as u64)];
    dims.extend((1..n_dims).map(|_| 1 + rng.below(3) as u64));
    dims
}

/// A small valid file from our writer, and what went into it.
pub struct Sample {
    pub writer: GgufWriter,
    /// Every metadata entry in order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Every tensor in order.
    pub tensors: Vec<SampleTensor>,
}

pub struct SampleTensor {
    pub name: String,
    pub ty: &'static GgmlType,
    pub dims: Vec<u64>,
    pub data: Vec<u8>,
}

/// Every value type and one tensor of each type in [`TENSOR_TYPES`] with random dims and data.
pub fn sample(rng: &mut Rng, version: u32, alignment: Option<u32>) -> Sample {
    let mut metadata = vec![("general.architecture".to_string(), "llama".into())];
    if let Some(a) = alignment {
        metadata.push(("general.alignment".to_string(), MetaValue::U32(a)));
    }
    metadata.extend(all_values(rng));
    let mut writer = GgufWriter::new().version(version);
    for (k, v) in &metadata {
        writer.add(k, v.clone()).unwrap();
    }
    let mut tensors = vec![];
    for (i, name) in TENSOR_TYPES.iter().enumerate() {
        let ty = GgmlType::from_name(name).unwrap();
        let dims = random_dims(rng, ty, 1 + i % 4);
        let bytes = dims.iter().product::<u64>() / ty.block * ty.bytes;
        let data = random_bytes(rng, bytes as usize);
        let name = format!("blk.{i}.{}", name.to_lowercase());
        writer.add_tensor(&name, ty, &dims, data.clone()).unwrap();
        tensors.push(SampleTensor {
            name,
            ty,
            dims,
            data,
        });
    }
    Sample {
        writer,
        metadata,
        tensors,
    }
}

/// Hand-made GGUF bytes, for files our writer would refuse to produce.
#[derive(Default, Clone)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// Magic, version and the two counts.
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }

    pub fn u32(&mut self, v: u32) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Raw {
        self.0.extend_from_slice(b);
        self
    }

    /// A GGUF string: u64 length, then the bytes.
    pub fn str(&mut self, s: impl AsRef<[u8]>) -> &mut Raw {
        let s = s.as_ref();
        self.u64(s.len() as u64).bytes(s)
    }

    /// A key and a value type id; the value follows.
    pub fn key(&mut self, key: &str, ty: u32) -> &mut Raw {
        self.str(key).u32(ty)
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Raw {
        self.str(name).u32(dims.len() as u32);
        dims.iter().for_each(|&d| {
            self.u64(d);
        });
        self.u32(ty).u64(offset)
    }

    /// Zero bytes up to a multiple of `alignment`.
    pub fn pad(&mut self, alignment: usize) -> &mut Raw {
        self.0.resize(self.0.len().next_multiple_of(alignment), 0);
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Raw {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// Visit every metadata value (each array element included) and every byte of every tensor's
/// data, as a consumer would, checking what a successful parse promises: arrays yield their
/// length of their element type; tensors lie aligned, disjoint and inside the file. Returns a
/// checksum so the work is not optimised away.
pub fn walk(g: &Gguf<'_>) -> u64 {
    let mut sum = 0u64;
    let mut add = |bytes: &[u8]| {
        sum = bytes
            .iter()
            .fold(sum, |s, &b| s.rotate_left(5).wrapping_add(b as u64))
    };
    for (key, v) in g.metadata() {
        add(key.as_bytes());
        match v {
            Value::Array(a) => {
                let mut n = 0;
                for item in a.iter() {
                    assert_eq!(item.value_type(), a.elem, "array '{key}'");
                    add(item.to_string().as_bytes());
                    n += 1;
                }
                assert_eq!(n, a.len, "array '{key}' yields its length");
            }
            v => add(v.to_string().as_bytes()),
        }
    }
    let mut spans = vec![];
    for t in g.tensors() {
        assert_eq!(t.offset % g.alignment, 0, "tensor '{}' aligned", t.name);
        let data = g.tensor_data(t);
        assert_eq!(data.len() as u64, t.bytes, "tensor '{}'", t.name);
        add(data);
        if t.bytes > 0 {
            spans.push((t.offset, t.offset + t.bytes));
        }
    }
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "tensors disjoint"
    );
    sum
}

/// KV-like data: per-channel offsets and scales, a few outlier channels.
pub fn kv_data(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let bias: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
    let scale: Vec<f32> = (0..d)
        .map(|_| {
            if rng.below(16) == 0 {
                10.0
            } else {
                0.2 + rng.uniform()
            }
        })
        .collect();
    (0..n * d)
        .map(|i| bias[i % d] + scale[i % d] * rng.normal())
        .collect()
}
