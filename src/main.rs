//! The `kvbits` command line: inspect GGUF models, evaluate cache types, benchmark, run.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
