//! One training step of each of the six tiny presets (`neural_arch_benches::presets`): forward,
//! loss, backward, gradient clipping and AdamW, at the trainers' batch sizes. Timings are for
//! comparison on one machine, not test assertions; `benches/report.py` runs them beside the
//! same steps in PyTorch at 1 and 2 threads.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use neural_arch::prelude::*;
use std::time::Duration;

fn steps(c: &mut Criterion) {
    let dev = Cpu::seed_from_u64(0);
    let mut group = c.benchmark_group("train_step");
    // A step takes 0.1-2 s: every sample runs the same number of steps.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    for mut p in neural_arch_benches::presets(&dev) {
        let (n, _) = p.items();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(p.name(), |b| b.iter(|| p.step().expect("a training step")));
    }
    group.finish();
}

criterion_group!(benches, steps);
criterion_main!(benches);
