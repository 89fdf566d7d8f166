//! `kvbits eval`: fidelity and memory of cache types and presets on synthetic
//! Qwen2.5-VL-7B-shaped KV (seeded) or on the user's own dumps.

use std::path::PathBuf;

use kvbits::Error;
use kvbits::eval::synth::{Synth, SynthConfig};
use kvbits::eval::{self, KvSource, NpySource, Row, RowSpec};
use kvbits::kv::{BlockTokens, FormatId};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Presets to evaluate (calibquant, vidkv, akvq, kivi2); repeat or comma-separate.
    /// With neither --preset nor --ctk/--ctv, every type and preset is evaluated.
    #[arg(long, value_name = "P", value_delimiter = ',')]
    preset: Vec<String>,
    /// K cache types (llama.cpp -ctk); paired in order with --ctv, V f16 where none is given.
    #[arg(
        long = "ctk",
        visible_alias = "cache-type-k",
        value_name = "K",
        value_delimiter = ','
    )]
    ctk: Vec<String>,
    /// V cache types (llama.cpp -ctv); K f16 where none is given.
    #[arg(
        long = "ctv",
        visible_alias = "cache-type-v",
        value_name = "V",
        value_delimiter = ','
    )]
    ctv: Vec<String>,
    /// Tokens per quantized block, or `all` for one block per appended span
    /// (default: each type's or preset's own).
    #[arg(long, value_name = "N|all", value_parser = parse_block_tokens)]
    block_tokens: Option<BlockTokens>,
    /// Print `{"rows": [...]}` instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw output error against effective bits per value into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Seed of the synthetic KV.
    #[arg(long, default_value_t = 0, conflicts_with = "k")]
    seed: u64,
    /// Evaluate only the first N layers of the synthetic model (a quicker look).
    #[arg(long, value_name = "N", conflicts_with = "k", value_parser = clap::value_parser!(u32).range(1..=28))]
    layers: Option<u32>,
    /// Dumped keys `[T][n_head_kv][D]` (f32 or f16 .npy, after RoPE) instead of synthetic KV.
    #[arg(long, value_name = "K.npy", requires_all = ["v", "q"])]
    k: Option<PathBuf>,
    /// Dumped values `[T][n_head_kv][D]`.
    #[arg(long, value_name = "V.npy", requires_all = ["k", "q"])]
    v: Option<PathBuf>,
    /// Dumped queries `[n_q][n_head][D]`, each attending to all T tokens.
    #[arg(long, value_name = "Q.npy", requires_all = ["k", "v"])]
    q: Option<PathBuf>,
    /// Tokens START..END of the dump are visual, the rest text (default: all visual).
    #[arg(long, value_name = "START:END", requires = "k", value_parser = parse_range)]
    visual: Option<(usize, usize)>,
}

fn parse_block_tokens(s: &str) -> Result<BlockTokens, String> {
    if s == "all" {
        return Ok(BlockTokens::All);
    }
    s.parse()
        .map(BlockTokens::Fixed)
        .map_err(|_| format!("'{s}' is neither a token count nor 'all'"))
}

fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(':').ok_or("expected START:END")?;
    let num = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{x}' is not a token index"))
    };
    Ok((num(a)?, num(b)?))
}

/// The rows asked for: K/V pairs in order, then presets; everything when nothing is asked.
fn row_specs(args: &Args) -> Result<Vec<RowSpec>, Error> {
    let parse = |names: &[String]| -> Result<Vec<FormatId>, Error> {
        names
            .iter()
            .map(|n| FormatId::from_name(n.trim()))
            .collect()
    };
    let (ks, vs) = (parse(&args.ctk)?, parse(&args.ctv)?);
    let n = ks.len().max(vs.len());
    if ks.len() > 1 && vs.len() > 1 && ks.len() != vs.len() {
        return Err(Error::InvalidArgument(format!(
            "{} K types and {} V types: give as many of each, or one to pair with all",
            ks.len(),
            vs.len()
        )));
    }
    let pick = |list: &[FormatId], i: usize| match list.len() {
        0 => FormatId::F16,
        1 => list[0],
        _ => list[i],
    };
    let mut specs: Vec<RowSpec> = (0..n)
        .map(|i| RowSpec::Pair {
            k: pick(&ks, i),
            v: pick(&vs, i),
        })
        .collect();
    specs.extend(
        args.preset
            .iter()
            .map(|p| RowSpec::Preset(p.trim().to_string())),
    );
    if specs.is_empty() {
        specs = RowSpec::all();
    }
    Ok(specs)
}

#[derive(Serialize)]
struct Report<'a> {
    rows: &'a [Row],
}

pub fn run(args: Args) -> Result<(), Error> {
    let specs = row_specs(&args)?;
    let src: Box<dyn KvSource> = match (&args.k, &args.v, &args.q) {
        (Some(k), Some(v), Some(q)) => Box::new(NpySource::open(k, v, q, args.visual)?),
        _ => {
            let full = SynthConfig::qwen2_5_vl_7b(args.seed);
            let n_layer = args.layers.map_or(full.n_layer, |n| n as usize);
            Box::new(Synth::new(SynthConfig { n_layer, ..full })?)
        }
    };
    let rows = eval::evaluate(src.as_ref(), &specs, args.block_tokens)?;
    let blocks = match args.block_tokens {
        None => "each type's default".to_string(),
        Some(BlockTokens::All) => "one per span".to_string(),
        Some(BlockTokens::Fixed(n)) => n.to_string(),
    };
    if args.json {
        let json = serde_json::to_string_pretty(&Report { rows: &rows })
            .map_err(|e| Error::InvalidArgument(format!("JSON output: {e}")))?;
        println!("{json}");
    } else {
        println!("{}", src.describe());
        println!("block tokens: {blocks}; reference: the f16 cache\n");
        print!("{}", table(&rows));
    }
    if let Some(path) = &args.plot {
        let title = format!("KV cache types: output error vs bits (block tokens: {blocks})");
        eval::plot::plot(&rows, &title, path)?;
        if !args.json {
            println!("\nplot written to {}", path.display());
        }
    }
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let head = [
        "type", "bits K", "bits V", "NMSE K", "NMSE V", "NMSE out", "KL", "top-32",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                format!("{:.3}", r.bits_k),
                format!("{:.3}", r.bits_v),
                format!("{:.3e}", r.nmse_k),
                format!("{:.3e}", r.nmse_v),
                format!("{:.3e}", r.nmse_out),
                format!("{:.3e}", r.kl),
                format!("{:.3}", r.top32),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: Vec<&str>| -> String {
        let mut s = format!("{:<w$}", cols[0], w = width[0]);
        for (c, w) in cols[1..].iter().zip(&width[1..]) {
            s += &format!("  {c:>w$}");
        }
        s + "\n"
    };
    let mut out = line(head.to_vec());
    for row in &cells {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}
