//! Writes `mathematical_accuracy_results.json` (or the path given) and prints the comparison
//! with the original framework's published accuracy.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin accuracy-report [-- OUT.json]
//! ```

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "mathematical_accuracy_results.json".into());
    let report = neural_arch_examples::accuracy::report();
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = write!(std::io::stdout(), "{}", report.comparison());
    let json = match serde_json::to_string_pretty(&report) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: cannot serialise the report: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&out, json + "\n") {
        eprintln!("error: cannot write {out}: {e}");
        return ExitCode::FAILURE;
    }
    let _ = writeln!(std::io::stdout(), "wrote {out}");
    ExitCode::SUCCESS
}
