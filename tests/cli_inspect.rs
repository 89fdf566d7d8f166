//! `kvbits inspect` run as a process on GGUF files the tests write: text, `--json`, `--key`,
//! `--tensors`, `--ctx`, `--mmproj`, the built-in demo, and the errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvbits::gguf::{GgmlType, Gguf, GgufWriter, MetaValue, ValueType};
use kvbits::kv::{Applies, FormatId, HEAD_DIMS, Role};
use kvbits::model::demo::DEMO_MODEL;
use kvbits::rng::Rng;
use serde_json::{Value as Json, json};

fn fresh_rng(test: &str) -> Rng {
    let seed = Rng::fresh_seed();
    println!("{test}: seed {seed}");
    Rng::new(seed)
}

/// A directory under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "kvbits-cli-{name}-{}-{}",
            std::process::id(),
            Rng::fresh_seed()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Run {
    code: Option<i32>,
    pid: u32,
    stdout: String,
    stderr: String,
}

/// `kvbits inspect ARGS...`.
fn inspect<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_kvbits"))
        .arg("inspect")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the kvbits binary runs");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        pid,
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

impl Run {
    /// Exit code 0, nothing on stderr.
    fn ok(self) -> Run {
        assert_eq!(
            self.code,
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(self.stderr.is_empty(), "stderr: {}", self.stderr);
        self
    }

    /// Exit code 1, no panic, nothing on stdout, and stderr says every one of `needles`.
    fn fails_saying(self, needles: &[&str]) {
        assert_eq!(
            self.code,
            Some(1),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert!(self.stdout.is_empty(), "stdout: {}", self.stdout);
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr '{}' does not say '{n}'",
                self.stderr
            );
        }
    }

    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json output does not parse ({e}):\n{}", self.stdout))
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A model written by the test: what went in, to compare with what comes out.
struct Model {
    bytes: Vec<u8>,
    arch: &'static str,
    n_layer: usize,
    n_head: usize,
    n_head_kv: Vec<usize>,
    dk: usize,
    dv: usize,
    ctx: u64,
    /// Every metadata key and the JSON `--json` must give for it.
    metadata: Vec<(String, Json)>,
    /// name, ggml type, dims, offset in the data section, bytes.
    tensors: Vec<(String, &'static str, Vec<u64>, u64, u64)>,
}

impl Model {
    /// Σ over layers n_head_kv·(dk·bits_K + dv·bits_V)/8.
    fn kv_bytes(&self, bits_k: f64, bits_v: f64) -> f64 {
        self.n_head_kv
            .iter()
            .map(|&h| h as f64 * (self.dk as f64 * bits_k + self.dv as f64 * bits_v) / 8.0)
            .sum()
    }
}

/// A hybrid-style model with random shape, per-layer KV heads (some 0), every kind of metadata
/// value, short and long arrays, and tensors of several ggml types with random contents.
fn random_model(rng: &mut Rng, uniform_kv: bool) -> Model {
    let arch = "qwen3";
    let n_layer = 2 + rng.below(40);
    let n_head = [8, 16, 32, 64][rng.below(4)];
    let n_head_kv: Vec<usize> = if uniform_kv {
        vec![1 + rng.below(8); n_layer]
    } else {
        (0..n_layer).map(|_| rng.below(9)).collect()
    };
    let dk = HEAD_DIMS[rng.below(HEAD_DIMS.len())];
    let dv = HEAD_DIMS[rng.below(HEAD_DIMS.len())];
    let ctx = 1024 + rng.next_u64() % 300_000;
    let n_tokens = 17 + rng.below(60);
    let tokens: Vec<String> = (0..n_tokens)
        .map(|i| format!("tok{i}_Ġ{}", rng.below(1000)))
        .collect();
    let align: u64 = [32, 64, 128][rng.below(3)];

    let i32s = |v: &[i32]| {
        MetaValue::Array(
            ValueType::I32,
            v.iter().map(|&x| MetaValue::I32(x)).collect(),
        )
    };
    let k = |s: &str| format!("{arch}.{s}");
    let kv: Vec<i32> = n_head_kv.iter().map(|&h| h as i32).collect();
    let (kv_value, kv_json) = if uniform_kv {
        (MetaValue::I64(kv[0].into()), json!(kv[0]))
    } else if n_layer > 16 {
        (i32s(&kv), json!({"type": "int32", "len": n_layer}))
    } else {
        (i32s(&kv), json!(kv))
    };
    // 16 elements is still short; 17 is long.
    let sixteen = tokens[..16].to_vec();
    let scores = (0..n_tokens).map(|i| MetaValue::F32(-(i as f32))).collect();
    let bools = vec![MetaValue::Bool(true), MetaValue::Bool(false)];
    // Every key, the value written and the JSON `--json` must give for it.
    let mut entries: Vec<(String, MetaValue, Json)> = vec![
        ("general.architecture".into(), arch.into(), json!(arch)),
        (
            "general.name".into(),
            "kvbits test".into(),
            json!("kvbits test"),
        ),
        (
            k("block_count"),
            MetaValue::U32(n_layer as u32),
            json!(n_layer),
        ),
        (k("context_length"), MetaValue::U64(ctx), json!(ctx)),
        (
            k("embedding_length"),
            MetaValue::U32((n_head * dk) as u32),
            json!(n_head * dk),
        ),
        (
            k("attention.head_count"),
            MetaValue::U16(n_head as u16),
            json!(n_head),
        ),
        (k("attention.head_count_kv"), kv_value, kv_json),
        (
            k("attention.key_length"),
            MetaValue::U16(dk as u16),
            json!(dk),
        ),
        (
            k("attention.value_length"),
            MetaValue::I16(dv as i16),
            json!(dv),
        ),
        (k("rope.freq_base"), MetaValue::F32(1e6), json!(1e6)),
        (
            k("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(1e-6),
            json!(1e-6f32),
        ),
        (
            k("rope.dimension_sections"),
            i32s(&[24, 20, 20, 0]),
            json!([24, 20, 20, 0]),
        ),
        ("test.negative_i8".into(), MetaValue::I8(-5), json!(-5)),
        (
            "test.big_u64".into(),
            MetaValue::U64(u64::MAX),
            json!(u64::MAX),
        ),
        (
            "test.min_i64".into(),
            MetaValue::I64(i64::MIN),
            json!(i64::MIN),
        ),
        ("test.f64".into(), MetaValue::F64(-2.5e300), json!(-2.5e300)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(false),
            json!(false),
        ),
        (
            "test.sixteen".into(),
            MetaValue::strings(sixteen.clone()),
            json!(sixteen),
        ),
        (
            "test.seventeen_u8".into(),
            MetaValue::Array(ValueType::U8, vec![MetaValue::U8(7); 17]),
            json!({"type": "uint8", "len": 17}),
        ),
        (
            "test.empty".into(),
            MetaValue::Array(ValueType::F64, vec![]),
            json!([]),
        ),
        (
            "test.bools".into(),
            MetaValue::Array(ValueType::Bool, bools),
            json!([true, false]),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::strings(tokens),
            json!({"type": "string", "len": n_tokens}),
        ),
        (
            "tokenizer.ggml.scores".into(),
            MetaValue::Array(ValueType::F32, scores),
            json!({"type": "float32", "len": n_tokens}),
        ),
    ];
    if align != 32 {
        let a = (
            "general.alignment".into(),
            MetaValue::U32(align as u32),
            json!(align),
        );
        entries.insert(1, a);
    }
    let mut w = GgufWriter::new();
    for (key, value, _) in &entries {
        w.add(key, value.clone()).unwrap();
    }

    // (ggml type, bytes per block, values per block)
    let types = [
        ("F32", 4, 1),
        ("F16", 2, 1),
        ("BF16", 2, 1),
        ("Q8_0", 34, 32),
        ("Q4_K", 144, 256),
        ("Q6_K", 210, 256),
    ];
    let mut tensors = Vec::new();
    let mut offset = 0u64;
    for i in 0..3 + rng.below(6) {
        let (ty, block_bytes, block) = types[rng.below(types.len())];
        let mut dims = vec![block * (1 + rng.below(4) as u64)];
        for _ in 0..rng.below(4) {
            dims.push(1 + rng.below(5) as u64);
        }
        let n: u64 = dims.iter().product();
        let bytes = n / block * block_bytes;
        let data = (0..bytes).map(|_| rng.next_u64() as u8).collect();
        let name = format!("blk.{i}.attn_{}.weight", ["q", "k", "v", "output"][i % 4]);
        w.add_tensor(&name, GgmlType::from_name(ty).unwrap(), &dims, data)
            .unwrap();
        tensors.push((name, ty, dims, offset, bytes));
        offset = (offset + bytes).div_ceil(align) * align;
    }
    Model {
        bytes: w.to_bytes(),
        arch,
        n_layer,
        n_head,
        n_head_kv,
        dk,
        dv,
        ctx,
        metadata: entries.into_iter().map(|(k, _, j)| (k, j)).collect(),
        tensors,
    }
}

/// The metadata of `bytes` (no tensors) with `key` set to `value`, or removed when `None`.
fn rewritten(bytes: &[u8], key: &str, value: Option<MetaValue>) -> Vec<u8> {
    let gguf = Gguf::parse(bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in gguf.metadata().iter().filter(|(k, _)| *k != key) {
        w.add(k, v.to_owned()).unwrap();
    }
    if let Some(value) = value {
        w.add(key, value).unwrap();
    }
    w.to_bytes()
}

/// The Qwen2.5-VL mmproj: 560 px, patch 14, merge 2.
fn qwen_mmproj(projector: &str) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "clip").unwrap();
    w.add("clip.projector_type", projector).unwrap();
    w.add("clip.has_vision_encoder", true).unwrap();
    w.add("clip.vision.image_size", 560u32).unwrap();
    w.add("clip.vision.patch_size", 14u32).unwrap();
    w.add("clip.vision.spatial_merge_size", 2u32).unwrap();
    w.to_bytes()
}

/// The cache-type names the table must have a row for, each with its K and V format:
/// a format for one side pairs with f16 on the other.
fn expected_rows() -> Vec<(String, FormatId, FormatId)> {
    FormatId::ALL
        .iter()
        .map(|&f| match f.info().applies {
            Applies::Both => (f.name().to_owned(), f, f),
            Applies::Keys => (format!("{}/f16", f.name()), f, FormatId::F16),
            Applies::Values => (format!("f16/{}", f.name()), FormatId::F16, f),
        })
        .collect()
}

/// Bits the table must show: the formats with a fixed rate (q8_0 and q4_0: blocks of 32
/// along the head dim, exact when it is a multiple of 32; 80 and 112 end in a short block),
/// the others from their block size at the 128-token block the table assumes.
fn bits(f: FormatId, d: usize, role: Role) -> f64 {
    match f {
        FormatId::F16 => 16.0,
        FormatId::Q8_0 if d.is_multiple_of(32) => 8.5,
        FormatId::Q4_0 if d.is_multiple_of(32) => 4.5,
        _ => f.bits_per_value(d, role, 128),
    }
}

/// One row of the text table.
#[derive(Debug)]
struct Row {
    name: String,
    k_bits: f64,
    v_bits: f64,
    bytes: f64,
    total: f64,
    vs_f16: f64,
}

fn unit(u: &str) -> f64 {
    match u {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024f64.powi(2),
        "GiB" => 1024f64.powi(3),
        "TiB" => 1024f64.powi(4),
        other => panic!("unknown unit {other}"),
    }
}

/// The KV table of the text output: the lines after the `cache type` header, up to a blank.
fn table(out: &str) -> Vec<Row> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with("cache type"));
    assert!(lines.next().is_some(), "no KV table in:\n{out}");
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 7, "row '{l}'");
            let num = |s: &str| {
                s.parse::<f64>()
                    .unwrap_or_else(|_| panic!("'{s}' in '{l}'"))
            };
            Row {
                name: f[0].to_owned(),
                k_bits: num(f[1]),
                v_bits: num(f[2]),
                bytes: num(f[3]),
                total: num(f[4]) * unit(f[5]),
                vs_f16: num(f[6].strip_suffix('x').expect("ratio ends in x")),
            }
        })
        .collect()
}

/// Every row is there once, with the bits, bytes per token, total at `ctx` and ratio the
/// formula gives.
fn check_table(out: &str, m: &Model, ctx: u64) {
    assert!(
        out.contains(&format!("KV cache at {ctx} tokens")),
        "no 'KV cache at {ctx} tokens' in:\n{out}"
    );
    let rows = table(out);
    let want = expected_rows();
    assert_eq!(
        rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        want.iter().map(|r| r.0.as_str()).collect::<Vec<_>>()
    );
    let f16 = m.kv_bytes(16.0, 16.0);
    for (row, (name, k, v)) in rows.iter().zip(&want) {
        let (bk, bv) = (bits(*k, m.dk, Role::Key), bits(*v, m.dv, Role::Value));
        let bytes = m.kv_bytes(bk, bv);
        assert!((row.k_bits - bk).abs() <= 5e-4, "{name}: {row:?} vs {bk}");
        assert!((row.v_bits - bv).abs() <= 5e-4, "{name}: {row:?} vs {bv}");
        assert!(
            (row.bytes - bytes).abs() <= 0.05 + 1e-9 * bytes,
            "{name}: {row:?} vs {bytes}"
        );
        let total = bytes * ctx as f64;
        // Two decimals of a value of at least 1 in its unit.
        assert!(
            (row.total - total).abs() <= 0.005 * total.max(1.0),
            "{name}: {row:?} vs total {total}"
        );
        assert!(
            (row.vs_f16 - f16 / bytes).abs() <= 0.005 + 1e-9,
            "{name}: {row:?} vs ratio {}",
            f16 / bytes
        );
    }
}

fn kv_heads_text(kv: &[usize]) -> String {
    if kv.iter().all(|&h| h == kv[0]) {
        kv[0].to_string()
    } else {
        format!("{kv:?}")
    }
}

#[test]
fn text_output_names_the_shape_and_has_a_row_per_cache_type() {
    let mut rng = fresh_rng("text_output_names_the_shape_and_has_a_row_per_cache_type");
    let dir = Scratch::new("text");
    for uniform in [true, false] {
        let m = random_model(&mut rng, uniform);
        let path = dir.file("model.gguf", &m.bytes);
        let out = inspect(&[s(&path)]).ok().stdout;
        let shape = format!(
            "{}: {} layers, {} query heads, {} KV heads, head dim {} (K) / {} (V)",
            m.arch,
            m.n_layer,
            m.n_head,
            kv_heads_text(&m.n_head_kv),
            m.dk,
            m.dv
        );
        assert!(out.contains(&shape), "no '{shape}' in:\n{out}");
        assert!(out.contains(s(&path)), "the file is not named:\n{out}");
        assert!(
            out.contains(&format!("context  {} tokens", m.ctx)),
            "no context in:\n{out}"
        );
        assert!(out.contains("M-RoPE sections [24, 20, 20, 0]"), "{out}");
        check_table(&out, &m, m.ctx);
        // No tensor table unless asked.
        assert!(!out.contains(&m.tensors[0].0), "{out}");
    }
}

#[test]
fn ctx_changes_the_totals() {
    let mut rng = fresh_rng("ctx_changes_the_totals");
    let dir = Scratch::new("ctx");
    let m = random_model(&mut rng, true);
    let path = dir.file("model.gguf", &m.bytes);
    for ctx in [
        1,
        1 + rng.next_u64() % 10_000,
        1 + rng.next_u64() % 10_000_000,
    ] {
        let out = inspect(&[s(&path), "--ctx", &ctx.to_string()]).ok().stdout;
        check_table(&out, &m, ctx);
        let j = inspect(&[s(&path), "--ctx", &ctx.to_string(), "--json"])
            .ok()
            .json();
        assert_eq!(j["ctx"], json!(ctx));
        // The model's own context length does not change.
        assert_eq!(j["context_length"], json!(m.ctx));
    }
}

#[test]
fn json_has_every_field() {
    let mut rng = fresh_rng("json_has_every_field");
    let dir = Scratch::new("json");
    for uniform in [false, true] {
        let m = random_model(&mut rng, uniform);
        let path = dir.file("model.gguf", &m.bytes);
        let j = inspect(&[s(&path), "--json"]).ok().json();
        assert_eq!(j["architecture"], json!(m.arch));
        assert_eq!(j["n_layer"], json!(m.n_layer));
        assert_eq!(j["n_head"], json!(m.n_head));
        assert_eq!(j["n_head_kv"], json!(m.n_head_kv));
        assert_eq!(j["head_dim_k"], json!(m.dk));
        assert_eq!(j["head_dim_v"], json!(m.dv));
        assert_eq!(j["context_length"], json!(m.ctx));
        assert_eq!(j["n_tensors"], json!(m.tensors.len()));
        assert!(j.get("vision").is_none(), "vision without --mmproj");

        let meta = j["metadata"].as_object().expect("metadata is an object");
        assert_eq!(meta.len(), m.metadata.len(), "{meta:?}");
        for (key, want) in &m.metadata {
            let got = &meta[key.as_str()];
            match want {
                // Floats: compare at the precision they were written with.
                Json::Number(n) if n.is_f64() => {
                    let (g, w) = (got.as_f64().unwrap(), n.as_f64().unwrap());
                    assert!(g == w || (g as f32) == (w as f32), "{key}: {got} vs {want}");
                }
                _ => assert_eq!(got, want, "{key}"),
            }
        }

        let tensors = j["tensors"].as_array().expect("tensors is an array");
        assert_eq!(tensors.len(), m.tensors.len());
        for (t, (name, ty, dims, offset, bytes)) in tensors.iter().zip(&m.tensors) {
            assert_eq!(
                t,
                &json!({"name": name, "type": ty, "dims": dims, "offset": offset, "bytes": bytes})
            );
        }

        let kv = j["kv_bytes_per_token"]
            .as_object()
            .expect("kv_bytes_per_token is an object");
        assert_eq!(kv.len(), expected_rows().len());
        assert_eq!(kv["f16"], json!(m.kv_bytes(16.0, 16.0)));
        for (name, k, v) in expected_rows() {
            let want = m.kv_bytes(bits(k, m.dk, Role::Key), bits(v, m.dv, Role::Value));
            let got = kv[&name]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: {}", kv[&name]));
            assert!((got - want).abs() <= 1e-9 * want, "{name}: {got} vs {want}");
        }
    }
}

#[test]
fn mmproj_adds_the_vision_side() {
    let mut rng = fresh_rng("mmproj_adds_the_vision_side");
    let dir = Scratch::new("mmproj");
    let m = random_model(&mut rng, true);
    let model = dir.file("model.gguf", &m.bytes);
    let mmproj = dir.file("mmproj.gguf", &qwen_mmproj("qwen2.5vl_merger"));
    let args = [s(&model), "--mmproj", s(&mmproj)];

    let j = inspect(&[&args[..], &["--json"]].concat()).ok().json();
    assert_eq!(j["vision"]["projector_type"], json!("qwen2.5vl_merger"));
    assert_eq!(j["vision"]["image_size"], json!(560));
    assert_eq!(j["vision"]["patch_size"], json!(14));
    assert_eq!(j["vision"]["tokens_per_image"], json!(400));

    // 1280/28 = 45.7 -> 46 by 720/28 = 25.7 -> 26.
    let sized = [&args[..], &["--image-size", "1280x720"]].concat();
    let j = inspect(&[&sized[..], &["--json"]].concat()).ok().json();
    assert_eq!(j["vision"]["tokens_per_image"], json!(46 * 26));

    let out = inspect(&[&sized[..], &["--images", "8"]].concat())
        .ok()
        .stdout;
    assert!(out.contains("qwen2.5vl_merger"), "{out}");
    assert!(out.contains("-> 1196 tokens per image"), "{out}");
    assert!(
        out.contains(&format!("8 images = {} visual tokens", 8 * 1196)),
        "{out}"
    );
    check_table(&out, &m, m.ctx);
}

#[test]
fn key_prints_one_value() {
    let mut rng = fresh_rng("key_prints_one_value");
    let dir = Scratch::new("key");
    let m = random_model(&mut rng, false);
    let path = dir.file("model.gguf", &m.bytes);
    let key = |k: &str| inspect(&[s(&path), "--key", k]).ok().stdout;
    assert_eq!(key("general.name"), "kvbits test\n");
    assert_eq!(key("qwen3.block_count"), format!("{}\n", m.n_layer));
    assert_eq!(key("test.negative_i8"), "-5\n");
    assert_eq!(key("test.big_u64"), format!("{}\n", u64::MAX));
    assert_eq!(key("tokenizer.ggml.add_bos_token"), "false\n");
    // Arrays: one element per line, in full however long.
    let gguf = Gguf::parse(&m.bytes).unwrap();
    let tokens: Vec<String> = gguf
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert!(tokens.len() > 16);
    assert_eq!(key("tokenizer.ggml.tokens"), tokens.join("\n") + "\n");
    let kv: Vec<String> = m.n_head_kv.iter().map(|h| h.to_string()).collect();
    assert_eq!(key("qwen3.attention.head_count_kv"), kv.join("\n") + "\n");
    assert_eq!(key("test.empty"), "");
    // --key needs no valid shape: it works on an mmproj too.
    let mmproj = dir.file("mmproj.gguf", &qwen_mmproj("qwen2.5vl_merger"));
    let out = inspect(&[s(&mmproj), "--key", "clip.projector_type"])
        .ok()
        .stdout;
    assert_eq!(out, "qwen2.5vl_merger\n");
}

#[test]
fn tensors_lists_every_tensor() {
    let mut rng = fresh_rng("tensors_lists_every_tensor");
    let dir = Scratch::new("tensors");
    let m = random_model(&mut rng, true);
    let path = dir.file("model.gguf", &m.bytes);
    let out = inspect(&[s(&path), "--tensors"]).ok().stdout;
    for (name, ty, dims, offset, bytes) in &m.tensors {
        let row = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{out}"));
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(f[1], *ty, "{row}");
        assert!(row.contains(&format!("{dims:?}")), "{row}");
        assert_eq!(
            f[f.len() - 2..],
            [offset.to_string(), bytes.to_string()],
            "{row}"
        );
    }
    check_table(&out, &m, m.ctx);
}

#[test]
fn unsupported_head_dims_are_reported_not_sized() {
    let mut rng = fresh_rng("unsupported_head_dims_are_reported_not_sized");
    let dir = Scratch::new("headdim");
    let m = random_model(&mut rng, true);
    // One side at a dim no format handles (DeepSeek's 192, Mistral 3's 5120 / 32 = 160).
    for (key, bad) in [
        ("qwen3.attention.value_length", 192),
        ("qwen3.attention.key_length", 160),
    ] {
        let bytes = rewritten(&m.bytes, key, Some(MetaValue::U32(bad)));
        let path = dir.file("model.gguf", &bytes);
        let out = inspect(&[s(&path)]).ok().stdout;
        let mut rows = out
            .lines()
            .skip_while(|l| !l.starts_with("cache type"))
            .skip(1);
        for (name, _, _) in expected_rows() {
            let row = rows
                .next()
                .unwrap_or_else(|| panic!("no row {name} in:\n{out}"));
            assert_eq!(row.split_whitespace().next(), Some(name.as_str()), "{out}");
            assert!(
                row.contains("not supported") && row.contains(&bad.to_string()),
                "row '{row}' should name the unsupported head dim {bad}"
            );
        }
        let j = inspect(&[s(&path), "--json"]).ok().json();
        for (name, v) in j["kv_bytes_per_token"].as_object().unwrap() {
            assert!(v.is_null(), "{name}: {v}");
        }
    }
}

/// The shape line of Qwen2.5-VL-7B.
const QWEN25VL: &str = "qwen2vl: 28 layers, 28 query heads, 4 KV heads, head dim 128 (K) / 128 (V)";

#[test]
fn no_argument_inspects_the_demo() {
    let run = inspect::<&str>(&[]).ok();
    let out = &run.stdout;
    assert!(out.contains("demo"), "{out}");
    assert!(out.contains(QWEN25VL), "{out}");
    assert!(out.contains("context  128000 tokens"), "{out}");
    assert!(out.contains("M-RoPE sections [16, 24, 24, 0]"), "{out}");
    assert!(out.contains("qwen2.5vl_merger") && out.contains("-> 400 tokens per image"));
    // 28 layers · 4 heads · 256 values · 2 bytes = 57344 bytes per token at f16.
    let f16 = table(out).into_iter().find(|r| r.name == "f16").unwrap();
    assert_eq!(f16.bytes, 57344.0);
    // The temporary demo files are gone.
    let tmp = std::env::temp_dir().join(format!("kvbits-demo-{}", run.pid));
    assert!(!tmp.exists(), "{} left behind", tmp.display());

    let j = inspect(&["--json"]).ok().json();
    assert_eq!(j["architecture"], json!("qwen2vl"));
    assert_eq!(j["n_layer"], json!(28));
    assert_eq!(j["n_head"], json!(28));
    assert_eq!(j["n_head_kv"], json!(vec![4; 28]));
    assert_eq!(j["head_dim_k"], json!(128));
    assert_eq!(j["context_length"], json!(128000));
    assert_eq!(j["vision"]["tokens_per_image"], json!(400));
}

#[test]
fn write_demo_keeps_the_files() {
    let dir = Scratch::new("demo");
    let keep = dir.0.join("kept");
    let out = inspect(&["--write-demo", s(&keep)]).ok().stdout;
    assert!(out.contains(QWEN25VL), "{out}");
    let model = keep.join(DEMO_MODEL);
    assert!(model.exists(), "{out}");
    let again = inspect(&[s(&model)]).ok().stdout;
    assert!(again.contains(QWEN25VL), "{again}");
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let mut rng = fresh_rng("errors_name_the_file_and_the_problem");
    let dir = Scratch::new("errors");
    let m = random_model(&mut rng, true);
    let model = dir.file("model.gguf", &m.bytes);

    let missing = dir.0.join("no-such-model.gguf");
    inspect(&[s(&missing)]).fails_saying(&[s(&missing), "No such file"]);

    let text = dir.file("notes.txt", b"this is not a GGUF file, just some text\n");
    inspect(&[s(&text)]).fails_saying(&[s(&text), "not a GGUF file"]);

    let empty = dir.file("empty.gguf", b"");
    inspect(&[s(&empty)]).fails_saying(&[s(&empty), "truncated"]);

    // Cut anywhere before the end of the last tensor's data.
    let gguf = Gguf::parse(&m.bytes).unwrap();
    let last = gguf
        .tensors()
        .iter()
        .map(|t| t.offset + t.bytes)
        .max()
        .unwrap();
    let end = (gguf.data_offset + last) as usize;
    for _ in 0..6 {
        let cut = rng.below(end);
        let truncated = dir.file("truncated.gguf", &m.bytes[..cut]);
        inspect(&[s(&truncated)]).fails_saying(&[s(&truncated), "truncated"]);
        inspect(&[s(&truncated), "--key", "general.name"]).fails_saying(&[s(&truncated)]);
    }

    inspect(&[s(&model), "--key", "no.such.key"]).fails_saying(&[s(&model), "no.such.key"]);

    inspect(&[s(&model), "--images", "4"]).fails_saying(&["--images", "--mmproj"]);

    let mmproj = dir.file("mmproj.gguf", &qwen_mmproj("qwen2.5vl_merger"));
    inspect(&[s(&mmproj)]).fails_saying(&[s(&mmproj), "mmproj"]);

    let nomodel = dir.0.join("no-such-mmproj.gguf");
    inspect(&[s(&model), "--mmproj", s(&nomodel)]).fails_saying(&[s(&nomodel), "No such file"]);
    inspect(&[s(&model), "--mmproj", s(&text)]).fails_saying(&[s(&text), "not a GGUF file"]);

    let cogvlm = dir.file("cogvlm.gguf", &qwen_mmproj("cogvlm"));
    inspect(&[s(&model), "--mmproj", s(&cogvlm)]).fails_saying(&[
        s(&cogvlm),
        "cogvlm",
        "qwen2.5vl_merger",
    ]);

    // A model without block_count.
    let broken = rewritten(&m.bytes, "qwen3.block_count", None);
    let broken = dir.file("broken.gguf", &broken);
    inspect(&[s(&broken)]).fails_saying(&[s(&broken), "qwen3.block_count"]);
    inspect(&[s(&broken), "--json"]).fails_saying(&[s(&broken), "qwen3.block_count"]);

    inspect(&[s(&model), "--mmproj", s(&mmproj), "--image-size", "0x720"])
        .fails_saying(&[s(&mmproj), "0x720"]);
}

/// Preset totals split the context into visual tokens (images × tokens per image) in the
/// preset's visual formats, text in its text formats, and the recent window at f16.
#[test]
fn presets_split_visual_and_text_tokens() {
    let run = inspect(&["--json", "--ctx", "10000", "--images", "4"]).ok();
    let j: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let per_image = j["vision"]["tokens_per_image"].as_f64().unwrap();
    assert_eq!(j["visual_tokens"].as_f64().unwrap(), 4.0 * per_image);
    let (visual, text) = (4.0 * per_image, 10000.0 - 4.0 * per_image);
    let kv = |name: &str| j["kv_bytes_per_token"][name].as_f64().unwrap();
    let preset = |name: &str| j["preset_bytes_at_ctx"][name].as_f64().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
    assert!(close(
        preset("calibquant"),
        text * kv("f16") + visual * kv("q1_calib")
    ));
    assert!(close(preset("kivi2"), 10000.0 * kv("kivi2")));
    let recent = 128.0;
    let akvq = (text - recent) * kv("q4_had") + visual * kv("q2_had") + recent * kv("f16");
    assert!(close(preset("akvq"), akvq), "{} vs {akvq}", preset("akvq"));
    // Without images every token is text: calibquant is plain f16.
    let j: serde_json::Value =
        serde_json::from_str(&inspect(&["--json", "--ctx", "10000"]).ok().stdout).unwrap();
    let f16 = j["kv_bytes_per_token"]["f16"].as_f64().unwrap();
    assert!(close(
        j["preset_bytes_at_ctx"]["calibquant"].as_f64().unwrap(),
        10000.0 * f16
    ));
}
