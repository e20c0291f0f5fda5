//! Trains `DigitsMlp` on the UCI 8×8 handwritten digits and reports held-out accuracy.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin train-digits -- --epochs 30 --out runs/digits
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use neural_arch_examples::{model_summary, train_digits, DigitsConfig, DigitsModel};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModelArg {
    Mlp,
    Cnn,
}

/// Train a two-layer perceptron on the 1,797 UCI 8×8 handwritten digits (80/20 split, fixed
/// split seed) and write `summary.json` to the output directory.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Passes over the training examples.
    #[arg(long, default_value_t = DigitsConfig::default().epochs)]
    epochs: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = DigitsConfig::default().batch_size)]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = DigitsConfig::default().lr, allow_negative_numbers = true)]
    lr: f64,
    /// Which network: `mlp` (on the 64 pixels) or `cnn` (two conv-batchnorm-relu-pool stages on
    /// the digits enlarged to 32×32).
    #[arg(long, value_enum, default_value = "mlp")]
    model: ModelArg,
    /// Hidden width of the MLP: 32, 64, 128 or 256.
    #[arg(long, default_value_t = DigitsConfig::default().hidden)]
    hidden: usize,
    /// Seed of initialisation, batch order and dropout (the train/test split is fixed).
    #[arg(long, default_value_t = DigitsConfig::default().seed)]
    seed: u64,
    /// Directory for summary.json (created if missing).
    #[arg(long, default_value = "runs/digits")]
    out: PathBuf,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let launched = neural_arch_examples::cli::launched_world_size();
    anyhow::ensure!(
        launched == 1,
        "this process is one of {launched} that mpirun started, but train-digits trains in one \
         process (its 1,797 digits take seconds) and the copies would overwrite each other's \
         summary.json; run it without mpirun"
    );
    let cfg = DigitsConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        model: match args.model {
            ModelArg::Mlp => DigitsModel::Mlp,
            ModelArg::Cnn => DigitsModel::Cnn,
        },
        hidden: args.hidden,
        seed: args.seed,
        out: args.out,
        progress: true,
        ..DigitsConfig::default()
    };
    cfg.validate()?;
    let table = model_summary(cfg.model, cfg.hidden)?;
    let s = train_digits(&cfg)?;

    println!("{table}");
    println!("model              {}", s.model);
    println!("params             {}", s.params);
    println!(
        "train / test       {} / {}",
        s.train_examples, s.test_examples
    );
    println!("epochs / steps     {} / {}", s.epochs, s.steps);
    println!("final train loss   {:.4}", s.final_train_loss);
    println!(
        "final train acc    {:.2} %  (dropout on)",
        100.0 * s.final_train_accuracy
    );
    println!(
        "test accuracy      {:.2} %  ({} of {} held out)",
        100.0 * s.test_accuracy,
        s.test_correct,
        s.test_examples
    );
    println!("wall time          {:.2} s", s.wall_seconds);
    println!(
        "summary            {}",
        cfg.out.join("summary.json").display()
    );
    Ok(())
}
