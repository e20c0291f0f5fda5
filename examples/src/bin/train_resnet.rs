//! Trains a CIFAR-style ResNet (`tiny` preset: widths 16/32/64, 32×32×3 input, 10 classes) on
//! Fashion-MNIST, each image padded to 32×32 and repeated over 3 channels, with random crops
//! (shifts of up to 2 pixels each way) and left-right flips. Needs the data set:
//! `python3 tools/fetch_data.py fashion-mnist`. Prints the test accuracy at each evaluation.
//!
//! Fresh weights are the layers' defaults (PyTorch's: convolutions and `fc` uniform in
//! ±1/√fan-in, batch norm 1 and 0), which train well at this depth with batch norm; Kaiming
//! initialisation would matter for deeper networks. Batch norm uses the batch's statistics
//! (and updates the running ones) in training and the running statistics in evaluation.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin train-resnet -- --steps 300 --eval-limit 2000 --out runs/resnet
//! cargo run --release -p neural-arch-examples --bin train-resnet -- --resume runs/resnet --steps 600
//! ```

use clap::Parser;
use neural_arch::prelude::*;
use neural_arch_examples::cli::{report, Defaults};
use neural_arch_examples::images::{self, ImageArgs};
use neural_arch_models::resnet::ResNetTiny;
use std::process::ExitCode;

/// Train a ResNet on Fashion-MNIST.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: ImageArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let defaults = Defaults {
        steps: 1000,
        batch_size: 64,
        lr: 2e-3,
        eval_every: 200,
        warmup_steps: 50,
        unit: "images",
    };
    let result = match cli.args.common.preset.as_str() {
        "tiny" => images::run::<ResNetTiny>(
            "resnet",
            &cli.args,
            &defaults,
            <Built<ResNetTiny, f32, Cpu>>::load_options(),
            None,
            true,
            None,
        ),
        "18" | "34" | "50" | "resnet18" | "resnet34" | "resnet50" => Err(anyhow::anyhow!(
            "preset `{}` takes 224×224 images (ImageNet), not Fashion-MNIST; use --preset tiny",
            cli.args.common.preset
        )),
        other => Err(anyhow::anyhow!(
            "unknown preset `{other}` for resnet; choose tiny"
        )),
    };
    report(&cli.args.common, result)
}
