//! Times the fused CPU kernels of LayerNorm, Softmax and GELU against the same layers composed
//! of dfdx ops, in f32, forward and forward + backward; medians over repeated runs. No
//! assertions: the numbers are for the README and vary with the machine and its load.
//! `benches/pytorch/fused_cpu.py` times PyTorch on the same sizes.
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p neural-arch --example fused_cpu_bench
//! RAYON_NUM_THREADS=2 cargo run --release -p neural-arch --example fused_cpu_bench
//! ```
//!
//! The composition is what the layers run on other devices, written out here with dfdx ops
//! because the switch that forces it is test-only. The loss is `sum(y · g)` in both programs,
//! so its cost is in every forward + backward time; the last column times it alone (on the
//! input, without the layer), and it is most of dfdx's forward + backward time.

use neural_arch::prelude::*;
use std::time::Instant;

type Dev = Cpu;
const REPS: usize = 15;

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..REPS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[REPS / 2]
}

fn row(name: &str, fwd: [f64; 2], fwd_bwd: [f64; 2], loss_alone: f64) {
    println!(
        "{name:<28} forward: fused {:7.2} ms, composed {:7.2} ms | forward+backward: fused \
         {:7.2} ms, composed {:7.2} ms | the loss alone {loss_alone:6.2} ms",
        fwd[0], fwd[1], fwd_bwd[0], fwd_bwd[1]
    );
}

fn main() {
    let dev = Dev::seed_from_u64(0);
    println!(
        "RAYON_NUM_THREADS={} (rayon pool: {} threads), f32, median of {REPS}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
        rayon_threads()
    );

    // LayerNorm<768> on [8, 128, 768].
    let ln = dev.build_module::<LayerNorm<768>, f32>();
    let x: Tensor<Rank3<8, 128, 768>, f32, Dev> = dev.sample_normal();
    let g: Tensor<Rank3<8, 128, 768>, f32, Dev> = dev.sample_normal();
    let composed = |x: Tensor<Rank3<8, 128, 768>, f32, Dev, OwnedTape<f32, Dev>>| {
        type S = Rank3<8, 128, 768>;
        let w = ln
            .weight
            .retaped::<OwnedTape<f32, Dev>>()
            .broadcast::<S, _>();
        let b = ln.bias.retaped::<OwnedTape<f32, Dev>>().broadcast::<S, _>();
        x.normalize::<Axis<2>>(1e-5) * w + b
    };
    row(
        "LayerNorm<768> [8,128,768]",
        [
            median_ms(|| drop(ln.forward(x.clone()))),
            median_ms(|| {
                type S = Rank3<8, 128, 768>;
                let w = ln.weight.clone().broadcast::<S, _>();
                let b = ln.bias.clone().broadcast::<S, _>();
                drop(x.clone().normalize::<Axis<2>>(1e-5) * w + b)
            }),
        ],
        [
            median_ms(|| drop((ln.forward(x.leaky_trace()) * g.clone()).sum().backward())),
            median_ms(|| drop((composed(x.leaky_trace()) * g.clone()).sum().backward())),
        ],
        median_ms(|| drop((x.leaky_trace() * g.clone()).sum().backward())),
    );

    // Softmax over the last axis of [8, 12, 128, 128].
    let x: Tensor<Rank4<8, 12, 128, 128>, f32, Dev> = dev.sample_normal();
    let g: Tensor<Rank4<8, 12, 128, 128>, f32, Dev> = dev.sample_normal();
    row(
        "Softmax [8,12,128,128]",
        [
            median_ms(|| drop(Softmax.forward(x.clone()))),
            median_ms(|| drop(x.clone().softmax::<Axis<3>>())),
        ],
        [
            median_ms(|| {
                drop(
                    (Softmax.forward(x.leaky_trace()) * g.clone())
                        .sum()
                        .backward(),
                )
            }),
            median_ms(|| {
                drop(
                    (x.leaky_trace().softmax::<Axis<3>>() * g.clone())
                        .sum()
                        .backward(),
                )
            }),
        ],
        median_ms(|| drop((x.leaky_trace() * g.clone()).sum().backward())),
    );

    // Exact GELU on [8, 128, 3072]; the composition is dfdx's accurate_gelu alone (the layer
    // adds a gradient correction on other devices, which would cost more).
    let x: Tensor<Rank3<8, 128, 3072>, f32, Dev> = dev.sample_normal();
    let g: Tensor<Rank3<8, 128, 3072>, f32, Dev> = dev.sample_normal();
    row(
        "GELU [8,128,3072]",
        [
            median_ms(|| drop(Gelu.forward(x.clone()))),
            median_ms(|| drop(x.clone().accurate_gelu())),
        ],
        [
            median_ms(|| drop((Gelu.forward(x.leaky_trace()) * g.clone()).sum().backward())),
            median_ms(|| {
                drop(
                    (x.leaky_trace().accurate_gelu() * g.clone())
                        .sum()
                        .backward(),
                )
            }),
        ],
        median_ms(|| drop((x.leaky_trace() * g.clone()).sum().backward())),
    );
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
