//! Time to open and parse a multi-GB GGUF model: it must be the cost of the header alone.
//!
//! The model is shaped like Llama-3-8B in Q8_0 (291 tensors, about 8 GiB of tensor data) with a
//! realistic header: 150k-entry token and merge arrays, token types and a few dozen scalars.
//! Its tensor data is all zeros, written as holes, so the file costs almost no disk.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use kvbits::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue, ValueType};
use kvbits::rng::Rng;

const VOCAB: usize = 150_000;
const LAYERS: usize = 32;
const HIDDEN: u64 = 4096;
const KV: u64 = 1024;
const FFN: u64 = 14336;

/// A word-like token, 1 to 12 bytes, as BPE vocabularies have.
fn token(rng: &mut Rng, i: usize) -> String {
    let len = 1 + rng.below(12);
    let mut s: String = (0..len)
        .map(|_| (b'a' + rng.below(26) as u8) as char)
        .collect();
    if i.is_multiple_of(3) {
        s.insert(0, 'Ġ');
    }
    s
}

fn write_model(path: &Path) {
    let mut rng = Rng::new(1);
    let mut w = GgufWriter::new();
    let add = |w: &mut GgufWriter, k: &str, v: MetaValue| {
        w.add(k, v).unwrap();
    };
    add(&mut w, "general.architecture", "llama".into());
    add(&mut w, "general.name", "bench-8b".into());
    add(&mut w, "general.file_type", MetaValue::U32(7));
    add(&mut w, "general.quantization_version", MetaValue::U32(2));
    for (k, v) in [
        ("llama.context_length", 131072u32),
        ("llama.embedding_length", HIDDEN as u32),
        ("llama.block_count", LAYERS as u32),
        ("llama.feed_forward_length", FFN as u32),
        ("llama.rope.dimension_count", 128),
        ("llama.attention.head_count", 32),
        ("llama.attention.head_count_kv", 8),
        ("llama.vocab_size", VOCAB as u32),
    ] {
        add(&mut w, k, MetaValue::U32(v));
    }
    add(&mut w, "llama.rope.freq_base", MetaValue::F32(500000.0));
    add(
        &mut w,
        "llama.attention.layer_norm_rms_epsilon",
        MetaValue::F32(1e-5),
    );
    add(&mut w, "tokenizer.ggml.model", "gpt2".into());
    add(&mut w, "tokenizer.ggml.pre", "llama-bpe".into());
    let tokens: Vec<String> = (0..VOCAB).map(|i| token(&mut rng, i)).collect();
    let merges: Vec<String> = (0..VOCAB)
        .map(|i| format!("{} {}", token(&mut rng, i), token(&mut rng, i + 1)))
        .collect();
    add(&mut w, "tokenizer.ggml.tokens", MetaValue::strings(tokens));
    let types = (0..VOCAB).map(|i| MetaValue::I32(1 + (i % 7 == 0) as i32));
    add(
        &mut w,
        "tokenizer.ggml.token_type",
        MetaValue::Array(ValueType::I32, types.collect()),
    );
    add(&mut w, "tokenizer.ggml.merges", MetaValue::strings(merges));
    add(
        &mut w,
        "tokenizer.ggml.bos_token_id",
        MetaValue::U32(128000),
    );
    add(
        &mut w,
        "tokenizer.ggml.eos_token_id",
        MetaValue::U32(128009),
    );
    add(
        &mut w,
        "tokenizer.chat_template.roles",
        MetaValue::strings(["system", "user", "assistant", "tool"]),
    );

    let ty = |name| GgmlType::from_name(name).unwrap();
    let (f32t, q8) = (ty("F32"), ty("Q8_0"));
    let vocab = VOCAB as u64;
    w.add_tensor_zeros("token_embd.weight", q8, &[HIDDEN, vocab])
        .unwrap();
    for l in 0..LAYERS {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        w.add_tensor_zeros(&t("attn_norm"), f32t, &[HIDDEN])
            .unwrap();
        w.add_tensor_zeros(&t("attn_q"), q8, &[HIDDEN, HIDDEN])
            .unwrap();
        w.add_tensor_zeros(&t("attn_k"), q8, &[HIDDEN, KV]).unwrap();
        w.add_tensor_zeros(&t("attn_v"), q8, &[HIDDEN, KV]).unwrap();
        w.add_tensor_zeros(&t("attn_output"), q8, &[HIDDEN, HIDDEN])
            .unwrap();
        w.add_tensor_zeros(&t("ffn_norm"), f32t, &[HIDDEN]).unwrap();
        w.add_tensor_zeros(&t("ffn_gate"), q8, &[HIDDEN, FFN])
            .unwrap();
        w.add_tensor_zeros(&t("ffn_up"), q8, &[HIDDEN, FFN])
            .unwrap();
        w.add_tensor_zeros(&t("ffn_down"), q8, &[FFN, HIDDEN])
            .unwrap();
    }
    w.add_tensor_zeros("output_norm.weight", f32t, &[HIDDEN])
        .unwrap();
    w.add_tensor_zeros("output.weight", q8, &[HIDDEN, vocab])
        .unwrap();
    w.write_file(path).unwrap();
}

/// Removes the temporary model when the benchmark ends.
struct Model(PathBuf);

impl Drop for Model {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_and_parse(c: &mut Criterion) {
    let model =
        Model(std::env::temp_dir().join(format!("kvbits-bench-{}.gguf", std::process::id())));
    write_model(&model.0);
    let file = GgufFile::open(&model.0).unwrap();
    let g = file.parse().unwrap();
    let data: u64 = g.tensors().iter().map(|t| t.bytes).sum();
    println!(
        "model: {} tensors, {:.2} GiB of tensor data, header {:.2} MiB ({} bytes), file {} bytes",
        g.tensors().len(),
        data as f64 / (1u64 << 30) as f64,
        g.data_offset as f64 / (1u64 << 20) as f64,
        g.data_offset,
        file.bytes().len(),
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&model.0).unwrap().blocks();
        println!(
            "on disk: {:.2} MiB",
            (blocks * 512) as f64 / (1u64 << 20) as f64
        );
    }
    drop(g);
    drop(file);

    c.bench_function("gguf open+parse, 8B Q8_0 model", |b| {
        b.iter(|| {
            let file = GgufFile::open(black_box(&model.0)).unwrap();
            let g = file.parse().unwrap();
            black_box((g.tensors().len(), g.metadata().len()));
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = open_and_parse
}
criterion_main!(benches);
