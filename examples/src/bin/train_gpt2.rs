//! Trains GPT-2 (the `tiny` preset by default) on Shakespeare: the embedded plays with no
//! set-up, or all of them after `python3 tools/fetch_data.py shakespeare` (`--corpus
//! shakespeare`). Prints the validation loss beside the unigram baseline, and samples.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin train-gpt2
//! cargo run --release -p neural-arch-examples --bin train-gpt2 -- --steps 200 --out runs/quick
//! cargo run --release -p neural-arch-examples --bin train-gpt2 -- --resume runs/quick --steps 400
//! cargo run --release -p neural-arch-examples --bin train-gpt2 -- --eval-only --init-from W.safetensors --tokens T.json
//! ```

use clap::Parser;
use neural_arch::prelude::*;
use neural_arch_examples::cli::{report, Defaults};
use neural_arch_examples::lm::{self, Corpus, LmArgs};
use neural_arch_models::gpt2::{self, Gpt2Small, Gpt2Tiny};
use std::process::ExitCode;

/// Train GPT-2 on Shakespeare.
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
        "tiny" => lm::run::<8000, Gpt2Tiny>(
            "gpt2",
            &cli.lm,
            &defaults,
            <Built<Gpt2Tiny, f32, Cpu>>::load_options(),
            Corpus::Embedded,
            gpt2::init_rule(4),
        ),
        "small" => lm::run::<50257, Gpt2Small>(
            "gpt2",
            &cli.lm,
            &Defaults {
                lr: 6e-4,
                ..defaults
            },
            <Built<Gpt2Small, f32, Cpu>>::load_options(),
            Corpus::Embedded,
            gpt2::init_rule(12),
        ),
        other => Err(anyhow::anyhow!(
            "unknown preset `{other}` for gpt2; choose tiny or small"
        )),
    };
    report(&cli.lm.common, result)
}
