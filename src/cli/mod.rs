//! Argument parsing and dispatch; each subcommand lives in its own file.

mod bench;
mod eval;
mod inspect;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kvbits",
    version,
    about = "1-2 bit KV caches for multimodal LLMs in GGUF runtimes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF model's KV shape and the KV-cache size of every cache type.
    Inspect(inspect::Args),
    /// Measure fidelity and memory of every cache type on synthetic or dumped KV.
    Eval(eval::Args),
    /// Time decode attention per preset against our own f16 path, on the CPU or a GPU.
    Bench(bench::Args),
}

/// llama.cpp spells its cache-type flags `-ctk` and `-ctv`, which clap cannot take as short
/// options: accept them as `--ctk` and `--ctv`.
fn llama_style(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some("-ctk") => "--ctk".into(),
        Some("-ctv") => "--ctv".into(),
        _ => a,
    })
    .collect()
}

/// Run the command line; the process exit code (errors go to stderr, exit 1).
pub fn main() -> i32 {
    let cli = Cli::parse_from(llama_style(std::env::args_os()));
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kvbits: error: {e}");
            1
        }
    }
}
