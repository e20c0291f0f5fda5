//! Times each training step of one tiny preset, for profiling outside criterion:
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p neural-arch-benches --example steps -- gpt2 20
//! ```

use neural_arch::prelude::*;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "gpt2".into());
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let dev = Cpu::seed_from_u64(0);
    let Some(mut p) = neural_arch_benches::presets(&dev)
        .into_iter()
        .find(|p| p.name() == name)
    else {
        eprintln!("unknown preset `{name}`; choose gpt2, llama, bert, vit, resnet or clip");
        std::process::exit(2);
    };
    for i in 0..steps {
        let t = Instant::now();
        let loss = p.step().expect("a training step");
        println!(
            "step {i}: {:8.1} ms, loss {loss:.4}",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
