//! Trains the Llama-style transformer (RoPE, grouped-query attention, SwiGLU, RMSNorm; the
//! `tiny` preset by default) on the Brown corpus (`python3 tools/fetch_data.py brown`), with
//! its own byte-level BPE; `--corpus embedded` trains on the same Shakespeare as `train-gpt2`,
//! for a comparison at equal parameters and steps. Prints the validation loss beside the
//! unigram baseline, and samples.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin train-llama
//! cargo run --release -p neural-arch-examples --bin train-llama -- --steps 200 --out runs/quick
//! cargo run --release -p neural-arch-examples --bin train-llama -- --resume runs/quick --steps 400
//! cargo run --release -p neural-arch-examples --bin train-llama -- --eval-only --init-from W.safetensors --tokens T.json
//! ```

use clap::Parser;
use neural_arch::prelude::*;
use neural_arch_examples::cli::{report, Defaults};
use neural_arch_examples::lm::{self, Corpus, LmArgs};
use neural_arch_models::llama::{self, LlamaTiny};
use std::process::ExitCode;

/// Train a Llama-style transformer on the Brown corpus.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    lm: LmArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let defaults = Defaults {
        steps: 1000,
        batch_size: 16,
        lr: 1e-3,
        eval_every: 200,
        warmup_steps: 100,
        unit: "tokens",
    };
    let result = match cli.lm.common.preset.as_str() {
        "tiny" => lm::run::<8000, LlamaTiny>(
            "llama",
            &cli.lm,
            &defaults,
            <Built<LlamaTiny, f32, Cpu>>::load_options(),
            Corpus::Brown,
            llama::init_rule(),
        ),
        other => Err(anyhow::anyhow!(
            "unknown preset `{other}` for llama; choose tiny (the 1.1B `tinyllama` preset is for a GPU, issue #7)"
        )),
    };
    report(&cli.lm.common, result)
}
