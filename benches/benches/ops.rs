//! The operation table: each operation at a size it has in a tiny preset, forward and forward +
//! backward (the gradients of the input and of every parameter, from `sum()` of the output, as
//! `benches/pytorch/bench.py` does in PyTorch). Batch and sequence dimensions are run-time
//! sizes, as in the trainers. Timings are for comparison on one machine, not test assertions;
//! `benches/report.py` runs both sides at 1 and 2 threads.

use criterion::{criterion_group, criterion_main, Criterion};
use neural_arch::layers::linear;
use neural_arch::prelude::*;
use neural_arch_benches::{ids, values};
use std::time::Duration;

/// Rows `NAME/forward` and `NAME/forward_backward` for a module on an input; the gradients
/// are reused from one iteration to the next, as a trainer reuses them.
macro_rules! layer_rows {
    ($c:expr, $name:expr, $module:expr, $x:expr) => {{
        let mut m = $module;
        let x = $x;
        $c.bench_function(concat!($name, "/forward"), |b| {
            b.iter(|| m.forward(x.clone()))
        });
        let mut grads = Some(m.alloc_grads());
        $c.bench_function(concat!($name, "/forward_backward"), |b| {
            b.iter(|| {
                let mut g = grads.take().expect("returned by the last iteration");
                m.zero_grads(&mut g);
                let y = m.forward_mut(x.clone().traced(g));
                grads = Some(y.sum::<Rank0, _>().backward());
            })
        });
    }};
}

fn ops(c: &mut Criterion) {
    let dev = Cpu::seed_from_u64(0);

    // GPT-2 tiny's MLP input projection without its bias: 16 × 128 tokens, 128 -> 512, through
    // `linear`, the product every projection layer runs (the weight in PyTorch's `[out, in]`).
    let a = dev.tensor_from_vec(values(2048 * 128, 1), (2048usize, Const::<128>));
    let w = dev.tensor_from_vec(values(512 * 128, 2), (Const::<512>, Const::<128>));
    c.bench_function("matmul/forward", |b| {
        b.iter(|| linear(a.clone(), &w, None).expect("a CPU product"))
    });
    c.bench_function("matmul/forward_backward", |b| {
        // The gradients of the input and of the weight, as PyTorch's `a @ w` with both leaves.
        b.iter(|| {
            let y = linear(a.clone().leaky_traced(), &w, None).expect("a CPU product");
            y.sum::<Rank0, _>().backward()
        })
    });

    // ResNet tiny's first stage: 64 images of 16 channels, 32 × 32, 3 × 3, padding 1, no bias.
    layer_rows!(
        c,
        "conv2d",
        dev.build_module::<Conv2d<16, 16, 3, 1, 1, 1, 1, false, Const<32>, Const<32>>, f32>(),
        dev.tensor_from_vec(
            values(64 * 16 * 32 * 32, 3),
            (64usize, Const::<16>, Const::<32>, Const::<32>)
        )
    );

    // GPT-2 tiny's attention: qkv projection, causal softmax attention over 4 heads, output
    // projection, on 16 × 128 tokens of width 128.
    let tokens =
        || dev.tensor_from_vec(values(16 * 128 * 128, 4), (16usize, 128usize, Const::<128>));
    layer_rows!(
        c,
        "attention",
        dev.build_module::<CausalSelfAttention<128, 4>, f32>(),
        tokens()
    );
    layer_rows!(
        c,
        "layer_norm",
        dev.build_module::<LayerNorm<128>, f32>(),
        tokens()
    );
    // GPT-2 tiny's MLP activation (tanh approximation) on 16 × 128 tokens of width 512.
    layer_rows!(
        c,
        "gelu",
        dev.build_module::<GeluTanh, f32>(),
        dev.tensor_from_vec(values(16 * 128 * 512, 5), (16usize, 128usize, Const::<512>))
    );
    // Attention probabilities: 16 sequences × 4 heads of 128 × 128 scores.
    layer_rows!(
        c,
        "softmax",
        dev.build_module::<Softmax, f32>(),
        dev.tensor_from_vec(
            values(16 * 4 * 128 * 128, 6),
            (16usize, Const::<4>, 128usize, 128usize)
        )
    );
    // GPT-2 tiny's token embedding: 16 × 128 ids into 8000 × 128.
    layer_rows!(
        c,
        "embedding",
        dev.build_module::<Embedding<8000, 128>, f32>(),
        dev.tensor_from_vec(ids(16 * 128, 8000, 7), (16usize, 128usize))
    );
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = ops
}
criterion_main!(benches);
