//! Trains BERT (`tiny` preset: vocabulary 8000, width 128, 4 layers) in two stages: masked-LM
//! pre-training on the Brown corpus and movie-review snippets, then sentiment classification
//! of the snippets, evaluated on held-out snippets and, out of domain, on the UCI sentences.
//! Needs the data sets: `python3 tools/fetch_data.py brown vader sentiment`.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin train-bert -- --out runs/bert-mlm
//! cargo run --release -p neural-arch-examples --bin train-bert -- --task sentiment \
//!     --init-from runs/bert-mlm/checkpoint/model.safetensors --out runs/bert-sentiment
//! ```
//!
//! Fresh weights follow Hugging Face's BERT rule (`neural_arch::init::transformer_rule(0.02)`).

use clap::Parser;
use neural_arch_examples::bert::{self, BertArgs};
use neural_arch_examples::cli::{report, Defaults};
use std::process::ExitCode;

/// Pre-train BERT by masked-language modelling, or fine-tune it on movie-review sentiment.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: BertArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mlm = Defaults {
        steps: 2000,
        batch_size: 32,
        lr: 1e-3,
        eval_every: 250,
        warmup_steps: 100,
        unit: "tokens",
    };
    let sentiment = Defaults {
        steps: 600,
        batch_size: 32,
        lr: 2e-4,
        eval_every: 100,
        warmup_steps: 60,
        unit: "tokens",
    };
    report(&cli.args.common, bert::run(&cli.args, &mlm, &sentiment))
}
