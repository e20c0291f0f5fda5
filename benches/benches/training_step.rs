//! One training step (forward, backward, Adam) of a `model!` MLP, and the forward of the layers
//! it is made of. Timings are for comparison on one machine, not test assertions.

use criterion::{criterion_group, criterion_main, Criterion};
use neural_arch::prelude::*;

model! {
    /// A 784-256-256-10 perceptron, MNIST-sized.
    pub struct Mlp {
        fc1: Linear<784, 256>,
        act1: ReLU,
        fc2: Linear<256, 256>,
        ln: LayerNorm<256>,
        act2: GeluTanh,
        fc3: Linear<256, 10>,
    }
}

fn bench(c: &mut Criterion) {
    let dev = Cpu::seed_from_u64(0);
    let mut model = dev.build_module::<Mlp, f32>();
    let mut grads = model.alloc_grads();
    let mut opt = Adam::new(&model, AdamConfig::default());
    let x: Tensor<Rank2<64, 784>, f32, Cpu> = dev.sample_normal();
    let y: Tensor<Rank2<64, 10>, f32, Cpu> =
        dev.sample_normal::<Rank2<64, 10>>().softmax::<Axis<1>>();

    c.bench_function("mlp_784_256_256_10/forward/b64", |b| {
        b.iter(|| model.forward(x.clone()))
    });
    c.bench_function("mlp_784_256_256_10/train_step/b64", |b| {
        b.iter(|| {
            let logits = model.forward_mut(x.trace(grads.clone()));
            let loss = neural_arch::dfdx::losses::cross_entropy_with_logits_loss(logits, y.clone());
            grads = loss.backward();
            opt.update(&mut model, &grads)
                .expect("every parameter has a gradient");
            model.zero_grads(&mut grads);
        })
    });
    let ln = dev.build_module::<LayerNorm<256>, f32>();
    let h: Tensor<Rank2<64, 256>, f32, Cpu> = dev.sample_normal();
    c.bench_function("layer_norm_256/forward/b64", |b| {
        b.iter(|| ln.forward(h.clone()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
