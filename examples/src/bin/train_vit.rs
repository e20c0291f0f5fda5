//! Trains the Vision Transformer (`tiny` preset: 32×32×3 input, 4×4 patches, 10 classes) on
//! Fashion-MNIST, each image padded to 32×32 and repeated over 3 channels. Needs the data set:
//! `python3 tools/fetch_data.py fashion-mnist`. Prints the test accuracy at each evaluation and
//! draws `attention.png` at the end: attention rollout over 8 test images, where the class
//! token looks.
//!
//! Fresh weights follow Hugging Face's ViT rule (`neural_arch::init::transformer_rule(0.02)`):
//! matrices, the class token and the positions from `N(0, 0.02²)`, biases zero.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin train-vit -- --steps 300 --eval-limit 2000 --out runs/vit
//! cargo run --release -p neural-arch-examples --bin train-vit -- --resume runs/vit --steps 600
//! cargo run --release -p neural-arch-examples --bin train-vit -- --epochs 1
//! ```

use clap::Parser;
use neural_arch::prelude::*;
use neural_arch_examples::attention;
use neural_arch_examples::cli::{report, Defaults};
use neural_arch_examples::images::{self, ImageArgs};
use neural_arch_models::vit::VitTiny;
use std::process::ExitCode;

/// Train a Vision Transformer on Fashion-MNIST.
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
        lr: 1e-3,
        eval_every: 200,
        warmup_steps: 100,
        unit: "images",
    };
    let rule = neural_arch::init::transformer_rule(0.02);
    let result = match cli.args.common.preset.as_str() {
        "tiny" => images::run::<VitTiny>(
            "vit",
            &cli.args,
            &defaults,
            <Built<VitTiny, f32, Cpu>>::load_options(),
            Some(&rule),
            false,
            Some(&|model, test, out| {
                let path = out.join("attention.png");
                attention::write_attention_png(model, test, 8, &path)?;
                println!("attention maps of 8 test images in {}", path.display());
                Ok(())
            }),
        ),
        "b16" => Err(anyhow::anyhow!(
            "preset `b16` takes 224×224 images (ImageNet), not Fashion-MNIST; use --preset tiny"
        )),
        other => Err(anyhow::anyhow!(
            "unknown preset `{other}` for vit; choose tiny"
        )),
    };
    report(&cli.args.common, result)
}
