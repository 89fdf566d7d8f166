//! `ModelShape` and `VisionShape` from GGUF metadata written the way llama.cpp's converter
//! writes it for real models, `kv_bytes_per_token` against the formula, the errors, and the
//! built-in demo.

use kvbits::Error;
use kvbits::gguf::{Gguf, GgufError, GgufWriter, MetaValue, ValueType};
use kvbits::kv::{FormatId, HEAD_DIMS};
use kvbits::model::{COVERED_PROJECTORS, ModelShape, VisionShape, demo};
use kvbits::rng::Rng;

fn fresh_rng(test: &str) -> Rng {
    let seed = Rng::fresh_seed();
    println!("{test}: seed {seed}");
    Rng::new(seed)
}

/// `v` as a metadata integer of type `ty` (panics if it does not fit: a test bug).
fn int(ty: ValueType, v: i64) -> MetaValue {
    let fits = "value fits the chosen type";
    match ty {
        ValueType::U8 => MetaValue::U8(v.try_into().expect(fits)),
        ValueType::I8 => MetaValue::I8(v.try_into().expect(fits)),
        ValueType::U16 => MetaValue::U16(v.try_into().expect(fits)),
        ValueType::I16 => MetaValue::I16(v.try_into().expect(fits)),
        ValueType::U32 => MetaValue::U32(v.try_into().expect(fits)),
        ValueType::I32 => MetaValue::I32(v.try_into().expect(fits)),
        ValueType::U64 => MetaValue::U64(v.try_into().expect(fits)),
        ValueType::I64 => MetaValue::I64(v),
        other => panic!("{other} is not an integer type"),
    }
}

fn int_array(ty: ValueType, values: &[i64]) -> MetaValue {
    MetaValue::Array(ty, values.iter().map(|&v| int(ty, v)).collect())
}

const INT_TYPES: [ValueType; 8] = [
    ValueType::U8,
    ValueType::I8,
    ValueType::U16,
    ValueType::I16,
    ValueType::U32,
    ValueType::I32,
    ValueType::U64,
    ValueType::I64,
];

/// A random integer type that can hold every value of `values`.
fn int_type_for(rng: &mut Rng, values: &[i64]) -> ValueType {
    let fits = |ty: &ValueType| {
        values.iter().all(|&v| match ty {
            ValueType::U8 => u8::try_from(v).is_ok(),
            ValueType::I8 => i8::try_from(v).is_ok(),
            ValueType::U16 => u16::try_from(v).is_ok(),
            ValueType::I16 => i16::try_from(v).is_ok(),
            ValueType::U32 => u32::try_from(v).is_ok(),
            ValueType::I32 => i32::try_from(v).is_ok(),
            ValueType::U64 => v >= 0,
            _ => true,
        })
    };
    let ok: Vec<ValueType> = INT_TYPES.iter().copied().filter(fits).collect();
    ok[rng.below(ok.len())]
}

/// An LLM's attention hyper-parameters, as its HF config gives them.
#[derive(Clone, Debug)]
struct Llm {
    arch: &'static str,
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    /// One per layer; written as one scalar when `kv_array` is false.
    n_head_kv: Vec<usize>,
    kv_array: bool,
    key_length: Option<usize>,
    value_length: Option<usize>,
    context_length: u64,
    rope_dim: Option<u64>,
    rope_base: Option<f32>,
    sections: Option<Vec<i64>>,
    sliding_window: Option<u64>,
}

fn llm(arch: &'static str, layers: usize, embd: usize, heads: usize, kv: usize, ctx: u64) -> Llm {
    Llm {
        arch,
        n_layer: layers,
        n_embd: embd,
        n_head: heads,
        n_head_kv: vec![kv; layers],
        kv_array: false,
        key_length: None,
        value_length: None,
        context_length: ctx,
        rope_dim: None,
        rope_base: None,
        sections: None,
        sliding_window: None,
    }
}

impl Llm {
    /// The GGUF metadata, integers as u32 (what gguf-py writes), except where `ty` says.
    fn writer_with(&self, ty: &mut dyn FnMut(&str, &[i64]) -> ValueType) -> GgufWriter {
        let a = self.arch;
        let one = |suffix: &str, v: usize| Some((format!("{a}.{suffix}"), vec![v as i64], false));
        let kv: Vec<i64> = self.n_head_kv.iter().map(|&h| h as i64).collect();
        let ints = [
            one("block_count", self.n_layer),
            one("context_length", self.context_length as usize),
            one("embedding_length", self.n_embd),
            one("feed_forward_length", 4 * self.n_embd),
            one("attention.head_count", self.n_head),
            Some(if self.kv_array {
                (format!("{a}.attention.head_count_kv"), kv, true)
            } else {
                (format!("{a}.attention.head_count_kv"), vec![kv[0]], false)
            }),
            self.key_length.and_then(|k| one("attention.key_length", k)),
            self.value_length
                .and_then(|v| one("attention.value_length", v)),
            self.rope_dim
                .and_then(|d| one("rope.dimension_count", d as usize)),
            self.sliding_window
                .and_then(|s| one("attention.sliding_window", s as usize)),
        ];
        let mut w = GgufWriter::new();
        w.add("general.architecture", a).unwrap();
        w.add("general.name", format!("{a} test model")).unwrap();
        for (key, values, array) in ints.into_iter().flatten() {
            let t = ty(&key, &values);
            let value = if array {
                int_array(t, &values)
            } else {
                int(t, values[0])
            };
            w.add(&key, value).unwrap();
        }
        if let Some(base) = self.rope_base {
            w.add(&format!("{a}.rope.freq_base"), base).unwrap();
        }
        if let Some(sec) = &self.sections {
            w.add(
                &format!("{a}.rope.dimension_sections"),
                int_array(ValueType::I32, sec),
            )
            .unwrap();
        }
        w.add(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-6f32)
            .unwrap();
        w.add("tokenizer.ggml.model", "gpt2").unwrap();
        w
    }

    fn bytes(&self) -> Vec<u8> {
        self.writer_with(&mut |_, _| ValueType::U32).to_bytes()
    }

    fn head_dims(&self) -> (usize, usize) {
        let d = self.n_embd / self.n_head;
        (self.key_length.unwrap_or(d), self.value_length.unwrap_or(d))
    }

    fn expected(&self) -> ModelShape {
        let (head_dim_k, head_dim_v) = self.head_dims();
        ModelShape {
            architecture: self.arch.to_owned(),
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            n_head_kv: self.n_head_kv.clone(),
            head_dim_k,
            head_dim_v,
            context_length: self.context_length,
            rope_dim: self.rope_dim,
            rope_freq_base: self.rope_base.map(f64::from),
            rope_sections: self.sections.clone(),
            sliding_window: self.sliding_window,
        }
    }

    /// Σ over layers n_head_kv·(head_dim_k·bits_K + head_dim_v·bits_V)/8, with the bits given
    /// in halves so the sum is exact integer arithmetic.
    fn kv_bytes(&self, half_bits_k: u64, half_bits_v: u64) -> f64 {
        let (dk, dv) = self.head_dims();
        let sixteenths: u64 = self
            .n_head_kv
            .iter()
            .map(|&h| h as u64 * (dk as u64 * half_bits_k + dv as u64 * half_bits_v))
            .sum();
        sixteenths as f64 / 16.0
    }
}

fn parse(bytes: &[u8]) -> Result<ModelShape, Error> {
    let gguf = Gguf::parse(bytes).expect("the writer's output parses");
    ModelShape::from_gguf(&gguf)
}

/// The models of the brief, with the values of their HF configs (`config.json`).
fn real_models() -> Vec<Llm> {
    // Llama-3.1-8B: rope_theta 500000, max_position_embeddings 131072.
    let mut llama = llm("llama", 32, 4096, 32, 8, 131072);
    llama.rope_dim = Some(128);
    llama.rope_base = Some(500000.0);
    // Qwen2.5-7B.
    let mut qwen2 = llm("qwen2", 28, 3584, 28, 4, 131072);
    qwen2.rope_base = Some(1e6);
    // Qwen2.5-VL-7B: mrope_section [16, 24, 24], padded to four by the converter.
    let mut qwen2vl = llm("qwen2vl", 28, 3584, 28, 4, 128000);
    qwen2vl.rope_base = Some(1e6);
    qwen2vl.sections = Some(vec![16, 24, 24, 0]);
    // Qwen3-8B: head_dim 128 written as key/value length.
    let mut qwen3 = llm("qwen3", 36, 4096, 32, 8, 40960);
    qwen3.key_length = Some(128);
    qwen3.value_length = Some(128);
    qwen3.rope_base = Some(1e6);
    // Qwen3-VL-8B: mrope_section [24, 20, 20], rope_theta 5e6, 256K context.
    let mut qwen3vl = llm("qwen3vl", 36, 4096, 32, 8, 262144);
    qwen3vl.key_length = Some(128);
    qwen3vl.value_length = Some(128);
    qwen3vl.rope_base = Some(5e6);
    qwen3vl.sections = Some(vec![24, 20, 20, 0]);
    // Gemma-3-12B: head_dim 256 while 3840 / 16 = 240.
    let mut gemma3 = llm("gemma3", 48, 3840, 16, 8, 131072);
    gemma3.key_length = Some(256);
    gemma3.value_length = Some(256);
    gemma3.rope_base = Some(1e6);
    gemma3.sliding_window = Some(1024);
    // InternVL2.5-8B's LLM, InternLM2.5-7B-chat.
    let mut internlm2 = llm("internlm2", 32, 4096, 32, 8, 32768);
    internlm2.rope_base = Some(1e6);
    // Mistral-Small-3.1-24B: head_dim 128 while 5120 / 32 = 160.
    let mut mistral3 = llm("mistral3", 40, 5120, 32, 8, 131072);
    mistral3.key_length = Some(128);
    mistral3.value_length = Some(128);
    mistral3.rope_base = Some(1e9);
    // Phi-3.5-vision: full multi-head attention, head dim 96.
    let mut phi3 = llm("phi3", 32, 3072, 32, 32, 131072);
    phi3.rope_dim = Some(96);
    phi3.rope_base = Some(10000.0);
    vec![
        llama, qwen2, qwen2vl, qwen3, qwen3vl, gemma3, internlm2, mistral3, phi3,
    ]
}

/// LFM2-1.2B (the LLM of LFM2-VL-1.6B): attention in 6 of 16 layers, short convolutions in
/// the others, so llama.cpp writes head_count_kv per layer with zeros.
fn hybrid() -> Llm {
    let mut m = llm("lfm2", 16, 2048, 32, 8, 128000);
    m.n_head_kv = (0..16)
        .map(|l| {
            if [2, 5, 8, 10, 12, 14].contains(&l) {
                8
            } else {
                0
            }
        })
        .collect();
    m.kv_array = true;
    m.rope_base = Some(1e6);
    m
}

#[test]
fn real_models_parse_to_their_shapes() {
    for m in real_models().into_iter().chain([hybrid()]) {
        let shape = parse(&m.bytes()).unwrap_or_else(|e| panic!("{}: {e}", m.arch));
        assert_eq!(shape, m.expected(), "{}", m.arch);
        assert_eq!(
            shape.n_head_kv_max(),
            *m.n_head_kv.iter().max().unwrap(),
            "{}",
            m.arch
        );
    }
}

#[test]
fn head_dims_of_real_models() {
    // Spot checks written out, so a wrong default (n_embd / n_head) cannot hide in `expected`.
    let dims: Vec<(&str, usize, usize)> = real_models()
        .iter()
        .map(|m| {
            let s = parse(&m.bytes()).unwrap();
            (m.arch, s.head_dim_k, s.head_dim_v)
        })
        .collect();
    for (arch, k, v) in dims {
        let want = match arch {
            "gemma3" => 256,
            "phi3" => 96,
            _ => 128,
        };
        assert_eq!((k, v), (want, want), "{arch}");
    }
}

#[test]
fn kv_bytes_f16_match_the_formula() {
    let mut rng = fresh_rng("kv_bytes_f16_match_the_formula");
    for m in real_models().into_iter().chain([hybrid()]) {
        let shape = parse(&m.bytes()).unwrap();
        let block = [32, 64, 128, 256][rng.below(4)];
        assert_eq!(
            shape.kv_bytes_per_token(FormatId::F16, FormatId::F16, block),
            Some(m.kv_bytes(32, 32)),
            "{} at {block} tokens per block",
            m.arch
        );
    }
    // Llama-3.1-8B at f16: 32 layers · 8 heads · 2 · 128 · 2 bytes = 128 KiB per token.
    let llama = parse(&real_models()[0].bytes()).unwrap();
    assert_eq!(
        llama.kv_bytes_per_token(FormatId::F16, FormatId::F16, 128),
        Some(131072.0)
    );
}

#[test]
fn kv_bytes_q8_0_q4_0_match_the_formula() {
    // q8_0: 34 bytes per 32 values = 8.5 bits; q4_0: 18 bytes per 32 = 4.5 bits.
    let pairs = [
        (FormatId::Q8_0, FormatId::Q8_0, 17, 17),
        (FormatId::Q4_0, FormatId::Q4_0, 9, 9),
        (FormatId::Q8_0, FormatId::Q4_0, 17, 9),
        (FormatId::F16, FormatId::Q4_0, 32, 9),
    ];
    for m in real_models().into_iter().chain([hybrid()]) {
        let shape = parse(&m.bytes()).unwrap();
        for (k, v, hk, hv) in pairs {
            assert_eq!(
                shape.kv_bytes_per_token(k, v, 128),
                Some(m.kv_bytes(hk, hv)),
                "{} with K {k} and V {v}",
                m.arch
            );
        }
    }
}

#[test]
fn unsupported_head_dim_has_no_kv_size() {
    // Mistral 3 without its key_length: 5120 / 32 = 160, which no format handles.
    let mut m = real_models()
        .into_iter()
        .find(|m| m.arch == "mistral3")
        .unwrap();
    m.key_length = None;
    m.value_length = None;
    let shape = parse(&m.bytes()).unwrap();
    assert_eq!((shape.head_dim_k, shape.head_dim_v), (160, 160));
    assert_eq!(
        shape.kv_bytes_per_token(FormatId::F16, FormatId::F16, 128),
        None
    );
    // Only V unsupported.
    m.key_length = Some(128);
    let shape = parse(&m.bytes()).unwrap();
    assert_eq!(
        shape.kv_bytes_per_token(FormatId::F16, FormatId::F16, 128),
        None
    );
}

#[test]
fn unusual_integer_types_are_accepted() {
    let mut m = real_models()
        .into_iter()
        .find(|m| m.arch == "qwen3")
        .unwrap();
    m.sliding_window = Some(4096);
    m.rope_dim = Some(128);
    let types = |key: &str, _: &[i64]| match key.rsplit_once("qwen3.").map(|(_, k)| k) {
        Some("block_count") => ValueType::U8,
        Some("embedding_length") => ValueType::I16,
        Some("attention.head_count") => ValueType::U64,
        Some("attention.head_count_kv") => ValueType::I64,
        Some("context_length") => ValueType::I64,
        Some("attention.key_length") => ValueType::U16,
        Some("attention.value_length") => ValueType::I16,
        Some("rope.dimension_count") => ValueType::U8,
        Some("attention.sliding_window") => ValueType::U64,
        _ => ValueType::U32,
    };
    let bytes = m.writer_with(&mut |k, v| types(k, v)).to_bytes();
    // The types really were written as asked.
    let gguf = Gguf::parse(&bytes).unwrap();
    let ty = |k: &str| gguf.get(&format!("qwen3.{k}")).unwrap().value_type();
    assert_eq!(ty("block_count"), ValueType::U8);
    assert_eq!(ty("embedding_length"), ValueType::I16);
    assert_eq!(ty("attention.head_count_kv"), ValueType::I64);
    assert_eq!(ty("attention.value_length"), ValueType::I16);
    assert_eq!(parse(&bytes).unwrap(), m.expected());
}

#[test]
fn random_shapes_with_random_integer_types() {
    let mut rng = fresh_rng("random_shapes_with_random_integer_types");
    for i in 0..200 {
        let n_layer = 1 + rng.below(80);
        let n_head = [1, 2, 4, 8, 16, 28, 32, 40, 64, 128][rng.below(10)];
        let dk = HEAD_DIMS[rng.below(HEAD_DIMS.len())];
        let mut m = llm("randarch", n_layer, n_head * dk, n_head, 0, 0);
        m.context_length = 1 + rng.next_u64() % (1 << 40);
        m.kv_array = rng.below(2) == 1;
        m.n_head_kv = if m.kv_array {
            (0..n_layer).map(|_| rng.below(n_head + 1)).collect()
        } else {
            vec![1 + rng.below(n_head); n_layer]
        };
        if rng.below(2) == 1 {
            m.key_length = Some(dk);
            m.value_length = Some(HEAD_DIMS[rng.below(HEAD_DIMS.len())]);
        }
        if rng.below(2) == 1 {
            m.sliding_window = Some(1 + rng.below(8192) as u64);
        }
        if rng.below(2) == 1 {
            m.rope_dim = Some(dk as u64);
        }
        let bytes = m
            .writer_with(&mut |_, values| int_type_for(&mut rng, values))
            .to_bytes();
        let shape = parse(&bytes).unwrap_or_else(|e| panic!("case {i} {m:?}: {e}"));
        assert_eq!(shape, m.expected(), "case {i}");
        assert_eq!(
            shape.kv_bytes_per_token(FormatId::F16, FormatId::F16, 128),
            Some(m.kv_bytes(32, 32)),
            "case {i} {m:?}"
        );
    }
}

/// The key a metadata error names, or a panic describing the unexpected error.
fn metadata_key(e: &Error) -> &str {
    match e {
        Error::Gguf(g) => match g.kind() {
            GgufError::Metadata { key, .. } => key,
            other => panic!("expected a metadata error, got {other}"),
        },
        other => panic!("expected a metadata error, got {other}"),
    }
}

/// Parsing `bytes` fails with an error naming `key` (in the variant and in the message).
fn assert_fails_on(bytes: &[u8], key: &str) -> String {
    let e = parse(bytes).expect_err(key);
    assert_eq!(metadata_key(&e), key);
    let msg = e.to_string();
    assert!(msg.contains(key), "message '{msg}' does not name {key}");
    msg
}

/// `m`'s file with `key` set to `value` (added if absent), or removed when `value` is `None`.
fn edited(m: &Llm, key: &str, value: Option<MetaValue>) -> Vec<u8> {
    let bytes = m.bytes();
    let gguf = Gguf::parse(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in gguf.metadata().iter().filter(|(k, _)| *k != key) {
        w.add(k, v.to_owned()).unwrap();
    }
    if let Some(value) = value {
        w.add(key, value).unwrap();
    }
    w.to_bytes()
}

fn without(m: &Llm, key: &str) -> Vec<u8> {
    edited(m, key, None)
}

fn with(m: &Llm, key: &str, value: MetaValue) -> Vec<u8> {
    edited(m, key, Some(value))
}

#[test]
fn missing_architecture_is_an_error_naming_it() {
    let m = &real_models()[0];
    assert_fails_on(&without(m, "general.architecture"), "general.architecture");
    assert_fails_on(
        &with(m, "general.architecture", MetaValue::U32(1)),
        "general.architecture",
    );
}

#[test]
fn missing_required_keys_are_errors_naming_them() {
    for m in real_models() {
        for suffix in [
            "block_count",
            "embedding_length",
            "attention.head_count",
            "context_length",
        ] {
            let key = format!("{}.{suffix}", m.arch);
            assert_fails_on(&without(&m, &key), &key);
        }
    }
    let m = &real_models()[0];
    let msg = assert_fails_on(&without(m, "llama.block_count"), "llama.block_count");
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn zero_counts_are_errors() {
    let m = &real_models()[0];
    assert_fails_on(
        &with(m, "llama.block_count", MetaValue::U32(0)),
        "llama.block_count",
    );
    assert_fails_on(
        &with(m, "llama.attention.head_count", MetaValue::U32(0)),
        "llama.attention.head_count",
    );
    // More layers than any model: rejected before per-layer tables are allocated.
    assert_fails_on(
        &with(m, "llama.block_count", MetaValue::U64(u64::MAX)),
        "llama.block_count",
    );
}

#[test]
fn an_mmproj_given_as_the_model_is_refused() {
    let mmproj = clip("qwen2.5vl_merger", 560, 14).to_bytes();
    let e = parse(&mmproj).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("mmproj") && msg.contains("--mmproj"),
        "message '{msg}' should say it is an mmproj and how to pass it"
    );
}

#[test]
fn head_count_kv_array_of_the_wrong_length() {
    let mut m = hybrid();
    m.kv_array = true;
    for len in [0, 15, 17, 32] {
        let kv: Vec<i64> = (0..len).map(|i| (i % 2) * 8).collect();
        let key = "lfm2.attention.head_count_kv";
        let msg = assert_fails_on(&with(&m, key, int_array(ValueType::I32, &kv)), key);
        assert!(
            msg.contains(&len.to_string()) && msg.contains("16"),
            "'{msg}' should give the entries and the layers"
        );
    }
}

#[test]
fn negative_values_are_errors_naming_the_key() {
    let mut m = real_models()
        .into_iter()
        .find(|m| m.arch == "gemma3")
        .unwrap();
    m.rope_dim = Some(256);
    // One layer of 48 negative.
    let mut kv = vec![8i64; 47];
    kv.push(-1);
    let cases: Vec<(&str, MetaValue)> = vec![
        ("gemma3.block_count", MetaValue::I32(-48)),
        ("gemma3.embedding_length", MetaValue::I64(-3840)),
        ("gemma3.attention.head_count", MetaValue::I16(-16)),
        ("gemma3.attention.head_count_kv", MetaValue::I32(-8)),
        ("gemma3.attention.key_length", MetaValue::I8(-1)),
        ("gemma3.attention.value_length", MetaValue::I32(-256)),
        ("gemma3.context_length", MetaValue::I64(-131072)),
        ("gemma3.rope.dimension_count", MetaValue::I32(-256)),
        ("gemma3.attention.sliding_window", MetaValue::I32(-1024)),
        (
            "gemma3.attention.head_count_kv",
            int_array(ValueType::I32, &kv),
        ),
        (
            "gemma3.attention.head_count",
            int_array(ValueType::I64, &[-16; 48]),
        ),
    ];
    for (key, value) in cases {
        assert_fails_on(&with(&m, key, value.clone()), key);
    }
}

#[test]
fn wrongly_typed_values_are_errors_naming_the_key() {
    let m = hybrid();
    let cases: Vec<(&str, MetaValue)> = vec![
        ("lfm2.block_count", MetaValue::String("16".into())),
        ("lfm2.embedding_length", MetaValue::F32(2048.0)),
        ("lfm2.attention.head_count_kv", MetaValue::Bool(true)),
        (
            "lfm2.attention.head_count_kv",
            MetaValue::Array(ValueType::F32, vec![MetaValue::F32(8.0); 16]),
        ),
        (
            "lfm2.rope.dimension_sections",
            MetaValue::strings(["16", "24", "24", "0"]),
        ),
    ];
    for (key, value) in cases {
        assert_fails_on(&with(&m, key, value.clone()), key);
    }
}

// ---- vision ----

/// An mmproj with the keys llama.cpp's converter writes for every projector.
fn clip(projector: &str, image_size: u32, patch_size: u32) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "clip")
        .unwrap()
        .add("clip.projector_type", projector)
        .unwrap()
        .add("clip.has_vision_encoder", true)
        .unwrap()
        .add("clip.has_text_encoder", false)
        .unwrap()
        .add("clip.vision.image_size", image_size)
        .unwrap()
        .add("clip.vision.patch_size", patch_size)
        .unwrap()
        .add("clip.vision.embedding_length", 1152u32)
        .unwrap()
        .add("clip.vision.block_count", 27u32)
        .unwrap();
    w
}

fn vision(w: &GgufWriter) -> Result<VisionShape, Error> {
    let bytes = w.to_bytes();
    let gguf = Gguf::parse(&bytes).expect("the writer's output parses");
    VisionShape::from_gguf(&gguf)
}

fn tokens(w: &GgufWriter, size: Option<(u64, u64)>) -> u64 {
    vision(w).unwrap().tokens_per_image(size).unwrap()
}

/// A random image size, `lo..=hi` pixels a side.
fn image_size(rng: &mut Rng, lo: u64, hi: u64) -> (u64, u64) {
    let mut side = || lo + rng.next_u64() % (hi - lo + 1);
    (side(), side())
}

/// Qwen's smart_resize as llama.cpp does it (std::round: half away from zero): each side to
/// the nearest multiple of patch·merge, at least one, one token per merged patch.
fn qwen_tokens(w: u64, h: u64, unit: u64) -> u64 {
    let side = |px: u64| ((px as f64 / unit as f64).round() as u64).max(1);
    side(w) * side(h)
}

#[test]
fn qwen2_5_vl_merger_tokens() {
    let mut rng = fresh_rng("qwen2_5_vl_merger_tokens");
    let mut w = clip("qwen2.5vl_merger", 560, 14);
    w.add("clip.vision.spatial_merge_size", 2u32).unwrap();
    let shape = vision(&w).unwrap();
    assert_eq!(
        shape,
        VisionShape {
            projector_type: "qwen2.5vl_merger".into(),
            has_vision_encoder: true,
            image_size: 560,
            patch_size: 14,
            spatial_merge_size: Some(2),
            scale_factor: None,
            n_embd: Some(1152),
            n_layer: Some(27),
        }
    );
    // 1280/28 = 45.7 -> 46, 720/28 = 25.7 -> 26.
    assert_eq!(tokens(&w, Some((1280, 720))), 46 * 26);
    assert_eq!(tokens(&w, None), 20 * 20);
    // 14 px is half a unit: llama.cpp rounds half away from zero.
    assert_eq!(tokens(&w, Some((28 * 10 + 14, 28))), 11);
    for _ in 0..200 {
        let (x, y) = image_size(&mut rng, 28, 1792);
        assert_eq!(tokens(&w, Some((x, y))), qwen_tokens(x, y, 28), "{x}x{y}");
    }
    // Smaller than one merged patch still costs one token.
    assert_eq!(tokens(&w, Some((5, 9))), 1);
}

#[test]
fn qwen2vl_and_qwen3vl_merger_tokens() {
    let mut rng = fresh_rng("qwen2vl_and_qwen3vl_merger_tokens");
    // Qwen2-VL mmproj files carry no merge size: 2 is implied.
    let qwen2vl = clip("qwen2vl_merger", 560, 14);
    assert_eq!(vision(&qwen2vl).unwrap().spatial_merge_size, None);
    // Qwen3-VL: patch 16, merge 2 (32 px per token), 768 px native.
    let mut qwen3vl = clip("qwen3vl_merger", 768, 16);
    qwen3vl.add("clip.vision.spatial_merge_size", 2u32).unwrap();
    assert_eq!(tokens(&qwen3vl, None), 24 * 24);
    assert_eq!(tokens(&qwen3vl, Some((1280, 720))), 40 * 23);
    for _ in 0..100 {
        let (x, y) = image_size(&mut rng, 28, 2048);
        assert_eq!(tokens(&qwen2vl, Some((x, y))), qwen_tokens(x, y, 28));
        assert_eq!(tokens(&qwen3vl, Some((x, y))), qwen_tokens(x, y, 32));
    }
}

#[test]
fn internvl_tokens() {
    // InternVL2.5: 448 px tiles, patch 14, pixel shuffle by 2: (32·32)/4 = 256 per tile.
    let mut w = clip("internvl", 448, 14);
    assert_eq!(tokens(&w, None), 256);
    assert_eq!(tokens(&w, Some((448, 448))), 256);
    assert_eq!(tokens(&w, Some((300, 200))), 256);
    w.add("clip.vision.projector.scale_factor", 2u32).unwrap();
    assert_eq!(vision(&w).unwrap().scale_factor, Some(2));
    assert_eq!(tokens(&w, None), 256);
    // A 2:1 image is two tiles plus the thumbnail InternVL adds to any multi-tile image.
    assert_eq!(tokens(&w, Some((896, 448))), 3 * 256);
}

/// Projector, image size, patch, scale factor, tokens per image, and whether every image is
/// resized to the encoder's square (so its size does not matter).
type Fixed = (&'static str, u32, u32, Option<u32>, u64, bool);

#[test]
fn fixed_count_projectors() {
    let mut rng = fresh_rng("fixed_count_projectors");
    let cases: [Fixed; 8] = [
        ("mlp", 336, 14, None, 576, true), // LLaVA-1.5: every patch a token
        ("mlp_norm", 336, 14, None, 576, true), // LLaVA-1.5 with a norm
        ("ldp", 336, 14, None, 144, true), // MobileVLM: 2x2 pooling
        ("ldpv2", 336, 14, None, 144, true), // MobileVLM V2
        ("gemma3", 896, 14, None, 256, true), // 4096 patches pooled to 256
        ("llama4", 336, 14, None, 144, false), // per tile: 2x2 pixel shuffle
        ("idefics3", 364, 14, Some(2), 169, false), // Idefics3-8B: 26² patches / 4
        ("idefics3", 512, 16, Some(4), 64, false), // SmolVLM: 32² patches / 16
    ];
    for (projector, size, patch, scale, want, fixed) in cases {
        let mut w = clip(projector, size, patch);
        if let Some(s) = scale {
            w.add("clip.vision.projector.scale_factor", s).unwrap();
        }
        assert_eq!(tokens(&w, None), want, "{projector} at {size}");
        assert_eq!(tokens(&w, Some((size.into(), size.into()))), want);
        for _ in 0..20 {
            let (x, y) = image_size(&mut rng, 1, 4096);
            if fixed {
                assert_eq!(tokens(&w, Some((x, y))), want, "{projector} {x}x{y}");
            }
        }
    }
    // Idefics3 without a scale factor: 2.
    assert_eq!(tokens(&clip("idefics3", 364, 14), None), 169);
}

/// Pixtral's preprocessing (HF `PixtralImageProcessor`): scale down to fit the longest edge,
/// keeping the aspect ratio, then one token per merged patch, a break token after every row
/// (the last one is [IMG_END]).
fn pixtral_tokens(w: u64, h: u64, longest: u64, unit: u64) -> u64 {
    let ratio = f64::max(w as f64 / longest as f64, h as f64 / longest as f64);
    let (w, h) = if ratio > 1.0 {
        (
            (w as f64 / ratio).floor() as u64,
            (h as f64 / ratio).floor() as u64,
        )
    } else {
        (w, h)
    };
    let (cols, rows) = ((w - 1) / unit + 1, (h - 1) / unit + 1);
    rows * (cols + 1)
}

#[test]
fn pixtral_tokens_within_the_longest_edge() {
    let mut rng = fresh_rng("pixtral_tokens_within_the_longest_edge");
    // Pixtral-12B: 1024 px, patch 16, no merge.
    let pixtral = clip("pixtral", 1024, 16);
    assert_eq!(tokens(&pixtral, None), 64 * 65);
    // Mistral-Small-3.1: 1540 px, patch 14, 2x2 merge.
    let mut mistral = clip("pixtral", 1540, 14);
    mistral.add("clip.vision.spatial_merge_size", 2u32).unwrap();
    assert_eq!(tokens(&mistral, None), 55 * 56);
    assert_eq!(tokens(&mistral, Some((1280, 720))), 26 * 47);
    for _ in 0..200 {
        let (x, y) = image_size(&mut rng, 1, 1024);
        assert_eq!(
            tokens(&pixtral, Some((x, y))),
            pixtral_tokens(x, y, 1024, 16)
        );
        let (x, y) = image_size(&mut rng, 1, 1540);
        assert_eq!(
            tokens(&mistral, Some((x, y))),
            pixtral_tokens(x, y, 1540, 28)
        );
    }
}

#[test]
fn pixtral_scales_large_images_down_to_the_longest_edge() {
    let mut rng = fresh_rng("pixtral_scales_large_images_down_to_the_longest_edge");
    let pixtral = clip("pixtral", 1024, 16);
    // 4000x3000 -> 1024x768: 64 columns, 48 rows.
    assert_eq!(tokens(&pixtral, Some((4000, 3000))), 48 * 65);
    let mut mistral = clip("pixtral", 1540, 14);
    mistral.add("clip.vision.spatial_merge_size", 2u32).unwrap();
    for _ in 0..200 {
        let (x, y) = image_size(&mut rng, 1025, 8192);
        assert_eq!(
            tokens(&pixtral, Some((x, y))),
            pixtral_tokens(x, y, 1024, 16)
        );
        let (x, y) = image_size(&mut rng, 1541, 8192);
        assert_eq!(
            tokens(&mistral, Some((x, y))),
            pixtral_tokens(x, y, 1540, 28)
        );
        // Never more than the square at the longest edge.
        assert!(tokens(&mistral, Some((x, y))) <= 55 * 56);
    }
}

#[test]
fn every_covered_projector_has_a_count() {
    for p in COVERED_PROJECTORS {
        let mut w = clip(p, 448, 14);
        w.add("clip.vision.spatial_merge_size", 2u32).unwrap();
        let n = tokens(&w, Some((448, 448)));
        assert!(n > 0, "{p}");
    }
}

#[test]
fn unknown_projector_is_unsupported_and_lists_the_covered() {
    for p in ["cogvlm", "minicpmv", "resampler", ""] {
        let shape = vision(&clip(p, 448, 14)).unwrap();
        let e = shape.tokens_per_image(None).unwrap_err();
        let Error::Unsupported(msg) = &e else {
            panic!("{p}: expected Unsupported, got {e:?}");
        };
        assert!(msg.contains(&format!("'{p}'")), "{msg}");
        for c in COVERED_PROJECTORS {
            assert!(msg.contains(c), "'{msg}' does not list {c}");
        }
    }
}

#[test]
fn vision_projector_type_key_of_multimodal_files() {
    // Files with audio and vision encoders name the vision projector under clip.vision.
    let mut w = GgufWriter::new();
    w.add("general.architecture", "clip").unwrap();
    w.add("clip.vision.projector_type", "qwen2.5vl_merger")
        .unwrap()
        .add("clip.audio.projector_type", "qwen2.5o")
        .unwrap()
        .add("clip.vision.image_size", 560u32)
        .unwrap()
        .add("clip.vision.patch_size", 14u32)
        .unwrap();
    let shape = vision(&w).unwrap();
    assert_eq!(shape.projector_type, "qwen2.5vl_merger");
    assert_eq!(shape.tokens_per_image(None).unwrap(), 400);
}

/// The mmproj of `clip("mlp", 336, 14)` without `key`.
fn mlp_without(key: &str) -> GgufWriter {
    let full = clip("mlp", 336, 14).to_bytes();
    let gguf = Gguf::parse(&full).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in gguf.metadata().iter().filter(|(k, _)| *k != key) {
        w.add(k, v.to_owned()).unwrap();
    }
    w
}

fn assert_vision_fails_on(w: &GgufWriter, key: &str) {
    let e = vision(w).expect_err(key);
    assert_eq!(metadata_key(&e), key);
    assert!(e.to_string().contains(key), "{e}");
}

#[test]
fn vision_errors_name_the_key() {
    assert_vision_fails_on(
        &mlp_without("clip.vision.image_size"),
        "clip.vision.image_size",
    );
    assert_vision_fails_on(
        &mlp_without("clip.vision.patch_size"),
        "clip.vision.patch_size",
    );
    assert_vision_fails_on(&mlp_without("clip.projector_type"), "clip.projector_type");
    for (key, value) in [
        ("clip.vision.patch_size", MetaValue::U32(0)),
        ("clip.vision.image_size", MetaValue::I32(-336)),
        ("clip.vision.image_size", MetaValue::String("336".into())),
        ("clip.vision.spatial_merge_size", MetaValue::U32(0)),
        ("clip.vision.projector.scale_factor", MetaValue::I64(-2)),
        ("clip.has_vision_encoder", MetaValue::U8(1)),
    ] {
        let mut w = mlp_without(key);
        w.add(key, value).unwrap();
        assert_vision_fails_on(&w, key);
    }
}

#[test]
fn audio_only_mmproj_and_empty_images_are_refused() {
    let mut w = mlp_without("clip.has_vision_encoder");
    w.add("clip.has_vision_encoder", false).unwrap();
    let e = vision(&w).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("clip.has_vision_encoder")),
        "{e:?}"
    );
    let shape = vision(&clip("qwen2.5vl_merger", 560, 14)).unwrap();
    for size in [(0, 720), (1280, 0), (0, 0)] {
        let e = shape.tokens_per_image(Some(size)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{size:?}: {e:?}");
    }
}

// ---- the demo ----

/// A directory under the system temp dir, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "kvbits-model-shapes-{name}-{}-{}",
            std::process::id(),
            Rng::fresh_seed()
        ));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn demo_files_have_qwen2_5_vl_7b_shape() {
    // Written into a directory that does not exist yet: write_demo creates it.
    let dir = TempDir::new("demo");
    let (model, mmproj) = demo::write_demo(&dir.0.join("nested")).unwrap();
    assert!(model.starts_with(&dir.0) && mmproj.starts_with(&dir.0));

    let file = kvbits::gguf::GgufFile::open(&model).unwrap();
    let gguf = file.parse().unwrap();
    let s = ModelShape::from_gguf(&gguf).unwrap();
    assert_eq!(s.architecture, "qwen2vl");
    assert_eq!(s.n_layer, 28);
    assert_eq!(s.n_embd, 3584);
    assert_eq!(s.n_head, 28);
    assert_eq!(s.n_head_kv, vec![4; 28]);
    assert_eq!((s.head_dim_k, s.head_dim_v), (128, 128));
    assert_eq!(s.context_length, 128000);
    assert_eq!(s.rope_freq_base, Some(1e6));
    assert_eq!(s.rope_sections, Some(vec![16, 24, 24, 0]));
    assert_eq!(s.sliding_window, None);
    // 28 layers · 4 heads · (128 + 128) · 2 bytes.
    assert_eq!(
        s.kv_bytes_per_token(FormatId::F16, FormatId::F16, 128),
        Some((28 * 4 * 256 * 2) as f64)
    );
    // Every tensor's data is where the header says, inside the file.
    for t in gguf.tensors() {
        assert_eq!(gguf.tensor_data(t).len() as u64, t.bytes, "{}", t.name);
    }

    let file = kvbits::gguf::GgufFile::open(&mmproj).unwrap();
    let v = VisionShape::from_gguf(&file.parse().unwrap()).unwrap();
    assert_eq!(v.projector_type, "qwen2.5vl_merger");
    assert_eq!((v.patch_size, v.spatial_merge_size), (14, Some(2)));
    assert_eq!(v.tokens_per_image(Some((560, 560))).unwrap(), 400);
    assert_eq!(v.tokens_per_image(None).unwrap(), 400);

    // Writing again over existing files works and gives the same bytes.
    let first = std::fs::read(&model).unwrap();
    demo::write_demo(&dir.0.join("nested")).unwrap();
    assert_eq!(std::fs::read(&model).unwrap(), first);
}

#[test]
fn demo_into_an_unwritable_place_is_an_io_error() {
    let dir = TempDir::new("blocked");
    std::fs::create_dir_all(&dir.0).unwrap();
    // A file where the directory should be.
    let blocker = dir.0.join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let e = demo::write_demo(&blocker.join("sub")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("file"), "{e}");
}
