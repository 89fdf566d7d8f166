//! `kvbits eval` on the command line: JSON and table output, the plot, argument errors.
//! Runs on small `.npy` dumps written here, so a debug build stays quick.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kvbits::eval::synth::{Synth, SynthConfig};
use kvbits::eval::{self, NpySource, RowSpec};
use kvbits::kv::FormatId;
use kvbits::rng::Rng;

fn kvbits(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvbits"))
        .args(args)
        .output()
        .unwrap()
}

struct Dumps {
    dir: PathBuf,
}

impl Dumps {
    /// K, V and Q of one layer of a small synthetic model, as f32 .npy files.
    fn new(tag: &str) -> Dumps {
        let seed = Rng::fresh_seed();
        eprintln!("seed {seed}");
        let cfg = SynthConfig {
            n_layer: 1,
            n_head: 8,
            n_head_kv: 2,
            head_dim: 64,
            n_prompt: 16,
            n_frames: 2,
            grid: 8,
            n_after: 4,
            n_query: 2,
            rope_theta: 1e6,
            mrope_section: [8, 12, 12],
            seed,
        };
        let l = Synth::new(cfg.clone()).unwrap().generate(0);
        let dir = std::env::temp_dir().join(format!("kvbits-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = cfg.n_tokens();
        write_npy(&dir.join("k.npy"), &[t, 2, 64], &l.k);
        write_npy(&dir.join("v.npy"), &[t, 2, 64], &l.v);
        write_npy(&dir.join("q.npy"), &[2, 8, 64], &l.q);
        Dumps { dir }
    }

    fn arg(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for f in ["k", "v", "q"] {
            a.push(format!("--{f}"));
            a.push(self.arg(&format!("{f}.npy")));
        }
        a
    }
}

impl Drop for Dumps {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_npy(path: &Path, shape: &[usize], a: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}\n",
        dims.join(", ")
    );
    let mut b = b"\x93NUMPY\x02\x00".to_vec();
    b.extend((header.len() as u32).to_le_bytes());
    b.extend(header.as_bytes());
    a.iter().for_each(|x| b.extend(x.to_le_bytes()));
    std::fs::write(path, b).unwrap();
}

fn run_ok(args: &[String]) -> String {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kvbits(&argv);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvbits {argv:?} failed: {err}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn json_rows_equal_the_library_and_the_plot_labels_them() {
    let d = Dumps::new("json");
    let svg = d.dir.join("plot.svg");
    let mut args: Vec<String> = [
        "eval",
        "--json",
        "--ctk",
        "q8_0,k1_5_mix",
        "--ctv",
        "q8_0,f16",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "--preset".into(),
        "kivi2".into(),
        "--visual".into(),
        "16:144".into(),
    ]);
    args.extend(["--plot".into(), svg.display().to_string()]);
    args.extend(d.args());
    let stdout = run_ok(&args);
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let rows = json["rows"].as_array().expect("a rows array");
    assert_eq!(json.as_object().unwrap().len(), 1);

    let src = NpySource::open(
        &d.dir.join("k.npy"),
        &d.dir.join("v.npy"),
        &d.dir.join("q.npy"),
        Some((16, 144)),
    )
    .unwrap();
    let specs = [
        RowSpec::Pair {
            k: FormatId::Q8_0,
            v: FormatId::Q8_0,
        },
        RowSpec::Pair {
            k: FormatId::K1_5Mix,
            v: FormatId::F16,
        },
        RowSpec::Preset("kivi2".into()),
    ];
    let want = eval::evaluate(&src, &specs, None).unwrap();
    assert_eq!(rows.len(), want.len());
    let fields = [
        "name", "bits_k", "bits_v", "nmse_k", "nmse_v", "nmse_out", "kl", "top32",
    ];
    for (got, want) in rows.iter().zip(&want) {
        let obj = got.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = fields.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(got["name"], want.name.as_str());
        // serde_json parses floats to within an ulp.
        let same = |key: &str, w: f64| {
            let g = got[key].as_f64().unwrap();
            assert!((g - w).abs() <= 1e-14 * w.abs(), "{key}: {g} vs {w}");
        };
        for (key, w) in [
            ("bits_k", want.bits_k),
            ("bits_v", want.bits_v),
            ("nmse_k", want.nmse_k),
            ("nmse_v", want.nmse_v),
            ("nmse_out", want.nmse_out),
            ("kl", want.kl),
            ("top32", want.top32),
        ] {
            same(key, w);
        }
    }
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["q8_0", "k1_5_mix/f16", "preset:kivi2"]);
    let plot = std::fs::read_to_string(&svg).unwrap();
    for n in names {
        assert!(plot.contains(n), "plot lacks '{n}'");
    }
}

#[test]
fn table_has_a_header_and_aligned_columns() {
    let d = Dumps::new("table");
    let mut args: Vec<String> = ["eval", "--ctk", "q4_0", "--block-tokens", "all"]
        .map(String::from)
        .to_vec();
    args.extend(d.args());
    let out = run_ok(&args);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("k.npy") && lines[0].contains("148 tokens"),
        "{out}"
    );
    assert!(lines[0].contains("8 query / 2 KV heads, D 64"), "{out}");
    assert!(lines[1].contains("one per span"), "{out}");
    let table: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("type"))
        .cloned()
        .collect();
    assert_eq!(table.len(), 2, "{out}");
    assert!(table[1].starts_with("q4_0/f16 "), "{out}");
    assert_eq!(table[0].len(), table[1].len(), "{out}");
    // Each header ends where its column does (right-aligned numbers).
    for h in ["bits K", "NMSE out", "top-32"] {
        let end = table[0].find(h).unwrap() + h.len();
        assert_ne!(table[1].as_bytes()[end - 1], b' ', "{h}: {out}");
    }
}

fn fails(args: &[&str], code: i32, needle: &str) {
    let out = kvbits(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: no '{needle}' in: {err}");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    fails(&["eval", "--ctk", "q3_x"], 1, "unknown cache type 'q3_x'");
    fails(&["eval", "--preset", "fast"], 1, "fast");
    fails(&["eval", "--ctv", "k1_5_mix"], 1, "cannot store values");
    fails(&["eval", "--block-tokens", "16"], 1, "block_tokens 16");
    fails(
        &["eval", "--ctk", "q8_0,q4_0", "--ctv", "f16,q4_0,q8_0"],
        1,
        "2 K types and 3 V types",
    );
    fails(
        &["eval", "--block-tokens", "many"],
        2,
        "neither a token count nor 'all'",
    );
    fails(&["eval", "--k", "k.npy"], 2, "--v");
    fails(&["eval", "--layers", "0"], 2, "--layers");
    fails(
        &[
            "eval",
            "--k",
            "/nonexistent/k.npy",
            "--v",
            "v.npy",
            "--q",
            "q.npy",
        ],
        1,
        "/nonexistent/k.npy",
    );
    let d = Dumps::new("bad");
    let mut args = vec!["eval".to_string(), "--visual".into(), "9:3".into()];
    args.extend(d.args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&argv, 1, "--visual 9:3");
}

/// The built-in data on the command line: one Qwen-sized layer, every default row. Some
/// seconds in a debug build, so it runs in release builds (`scripts/test.sh`).
#[test]
#[cfg_attr(debug_assertions, ignore = "a Qwen-sized layer: run in release")]
fn synthetic_default_rows() {
    let out = run_ok(&["eval", "--layers", "1", "--seed", "7"].map(String::from));
    assert!(
        out.starts_with("synthetic Qwen2.5-VL-7B-shaped KV (seed 7): 1 layer,"),
        "{out}"
    );
    assert!(out.contains("28 query / 4 KV heads, D 128"), "{out}");
    assert!(out.contains("64 text + 8 frames x 256 visual + 32 text tokens; 16 queries"));
    for spec in RowSpec::all() {
        let name = spec.name();
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "no row {name}: {out}"
        );
    }
}

/// llama.cpp's own spelling `-ctk K -ctv V` selects the same row as `--ctk K --ctv V`.
#[test]
fn llama_cpp_cache_type_flags() {
    let json = |args: &[&str]| -> serde_json::Value {
        let out = kvbits(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let short = json(&[
        "eval", "-ctk", "q8_0", "-ctv", "q4_0", "--layers", "1", "--json",
    ]);
    let long = json(&[
        "eval", "--ctk", "q8_0", "--ctv", "q4_0", "--layers", "1", "--json",
    ]);
    assert_eq!(short, long);
    let rows = short["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["bits_k"].as_f64(), Some(8.5));
    assert_eq!(rows[0]["bits_v"].as_f64(), Some(4.5));
}
