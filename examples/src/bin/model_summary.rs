//! Prints the layer table of any preset of the reference architectures: layer names (equal to
//! the checkpoint keys), output shapes as the DSL computed them, and parameter counts.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin model-summary -- gpt2 small
//! cargo run --release -p neural-arch-examples --bin model-summary -- --list
//! cargo run --release -p neural-arch-examples --bin model-summary -- resnet 50 --json
//! ```
//!
//! Nothing is built: the table and the counts are compile-time facts of the types, so even
//! the 1.1-billion-parameter Llama preset prints instantly.

use clap::Parser;
use neural_arch_models::ARCHITECTURES;
use std::io::Write;
use std::process::ExitCode;

/// Print the layer table of a model preset.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Architecture: gpt2, bert, vit, clip, resnet, llama, digits.
    arch: Option<String>,
    /// Preset of that architecture (`--list` shows them).
    preset: Option<String>,
    /// List every architecture and its presets, with parameter counts.
    #[arg(long)]
    list: bool,
    /// Print the table as JSON.
    #[arg(long)]
    json: bool,
}

fn list() -> String {
    let mut out = String::new();
    for (arch, presets) in ARCHITECTURES {
        out.push_str(&format!("{arch}:\n"));
        for (name, summary) in *presets {
            out.push_str(&format!(
                "  {name:<10} {:>15} parameters\n",
                group(summary().total_params)
            ));
        }
    }
    out
}

fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut stdout = std::io::stdout();
    let (Some(arch), Some(preset)) = (&args.arch, &args.preset) else {
        if args.list {
            let _ = write!(stdout, "{}", list());
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "usage: model-summary ARCH PRESET [--json]; the presets are:\n{}",
            list()
        );
        return ExitCode::FAILURE;
    };
    let Some((_, presets)) = ARCHITECTURES.iter().find(|(a, _)| a == arch) else {
        let names: Vec<&str> = ARCHITECTURES.iter().map(|(a, _)| *a).collect();
        eprintln!(
            "error: unknown architecture `{arch}`; choose one of {}",
            names.join(", ")
        );
        return ExitCode::FAILURE;
    };
    let Some((_, summary)) = presets.iter().find(|(p, _)| p == preset) else {
        let names: Vec<&str> = presets.iter().map(|(p, _)| *p).collect();
        eprintln!(
            "error: `{arch}` has no preset `{preset}`; choose one of {}",
            names.join(", ")
        );
        return ExitCode::FAILURE;
    };
    let s = summary();
    let text = if args.json {
        match serde_json::to_string_pretty(&s) {
            Ok(j) => j + "\n",
            Err(e) => {
                eprintln!("error: cannot serialise the summary: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        s.to_string()
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = write!(stdout, "{text}");
    ExitCode::SUCCESS
}
