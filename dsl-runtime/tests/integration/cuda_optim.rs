//! Losses, optimizers, clipping and optimizer state on CUDA against the CPU. On CUDA these run
//! their non-CPU paths (Lion and clipping composed of dfdx ops, state written through dfdx's SGD
//! kernel), which the CPU tests reach only by forcing them. Compiled only with the `cuda`
//! feature; needs a GPU to run.
#![cfg(feature = "cuda")]

use neural_arch::optim::{Optim, OptimizerState};
use neural_arch::prelude::*;

use crate::common::close;

#[test]
fn losses_match_the_cpu() {
    let cpu = Cpu::seed_from_u64(1);
    let gpu = Cuda::default();

    let x: Tensor<Rank3<2, 5, 7>, f32, Cpu> = cpu.sample_normal();
    let xg = x.to_device(&gpu);
    let targets = [1, 0, 6, 2, 0, 3, 3, 5, 0, 4];
    let opts = CrossEntropy {
        ignore_index: Some(0),
        label_smoothing: 0.1,
    };
    let lc = cross_entropy(x.leaky_trace(), &targets, opts).unwrap();
    let lg = cross_entropy(xg.leaky_trace(), &targets, opts).unwrap();
    close("cross_entropy", &[lc.array()], &[lg.array()], 1e-5);
    let (gc, gg) = (lc.backward(), lg.backward());
    close(
        "cross_entropy grad",
        &gc.get(&x).as_vec(),
        &gg.get(&xg).as_vec(),
        1e-6,
    );

    let img: Tensor<Rank2<6, 4>, f32, Cpu> = cpu.sample_normal();
    let txt: Tensor<Rank2<6, 4>, f32, Cpu> = cpu.sample_normal();
    let (ig, tg) = (img.to_device(&gpu), txt.to_device(&gpu));
    let sc = cpu.build_module::<LogitScale, f32>();
    let sg = sc.to_device(&gpu);
    let lc = clip_loss(img.leaky_trace(), txt.leaky_trace(), &sc).unwrap();
    let lg = clip_loss(ig.leaky_trace(), tg.leaky_trace(), &sg).unwrap();
    close("clip_loss", &[lc.array()], &[lg.array()], 1e-5);
    let (gc, gg) = (lc.backward(), lg.backward());
    close(
        "clip_loss d/dimage",
        &gc.get(&img).as_vec(),
        &gg.get(&ig).as_vec(),
        1e-5,
    );
    close(
        "clip_loss d/dtext",
        &gc.get(&txt).as_vec(),
        &gg.get(&tg).as_vec(),
        1e-5,
    );
    close(
        "clip_loss d/dlogit_scale",
        &gc.get(&sc.logit_scale).as_vec(),
        &gg.get(&sg.logit_scale).as_vec(),
        1e-5,
    );

    let y: Tensor<Rank2<6, 4>, f32, Cpu> = cpu.sample_uniform();
    let yg = y.to_device(&gpu);
    let bc = bce_with_logits(img.clone() * 10.0, y.clone()).unwrap();
    let bg = bce_with_logits(ig.clone() * 10.0, yg.clone()).unwrap();
    close("bce_with_logits", &[bc.array()], &[bg.array()], 1e-5);
    let mc = mse(img, y).unwrap();
    let mg = mse(ig, yg).unwrap();
    close("mse", &[mc.array()], &[mg.array()], 1e-5);
}

type Model<D> = Built<Linear<8, 4>, f32, D>;

/// The gradients of a fixed regression loss.
fn grads<D: Device<f32>>(m: &Model<D>, g: Gradients<f32, D>, step: usize) -> Gradients<f32, D> {
    let dev = m.weight.device().clone();
    let x: Vec<f32> = (0..24)
        .map(|i| ((i * 7 + step * 3) % 11) as f32 / 5.0 - 1.0)
        .collect();
    let y: Vec<f32> = (0..12)
        .map(|i| ((i * 5 + step) % 7) as f32 / 3.0 - 1.0)
        .collect();
    let x = dev.tensor_from_vec(x, (Const::<3>, Const::<8>));
    let y = dev.tensor_from_vec(y, (Const::<3>, Const::<4>));
    (m.forward(x.trace(g)) - y)
        .square()
        .mean::<Rank0, _>()
        .backward()
}

fn run<D: Device<f32>, O: Optim<Model<D>, f32, D>>(m: &mut Model<D>, opt: &mut O, steps: usize) {
    let mut g = m.alloc_grads();
    for step in 0..steps {
        m.zero_grads(&mut g);
        g = grads(m, g, step);
        opt.step(m, &mut g).unwrap();
    }
}

#[test]
fn optimizers_and_clipping_match_the_cpu() {
    let cpu = Cpu::seed_from_u64(2);
    let gpu = Cuda::default();
    let start = cpu.build_module::<Linear<8, 4>, f32>();

    let lion = LionConfig {
        lr: 1e-3,
        betas: [0.9, 0.99],
        weight_decay: 0.1,
    };
    let (mut mc, mut mg) = (start.clone(), start.to_device(&gpu));
    let (mut oc, mut og) = (Lion::new(&mc, lion), Lion::new(&mg, lion));
    run(&mut mc, &mut oc, 3);
    run(&mut mg, &mut og, 3);
    close(
        "Lion weight",
        &mc.weight.as_vec(),
        &mg.weight.as_vec(),
        1e-6,
    );
    let (sc, sg) = (oc.state(&mc).unwrap(), og.state(&mg).unwrap());
    close(
        "Lion exp_avg",
        &sc.buffers["weight.exp_avg"].values,
        &sg.buffers["weight.exp_avg"].values,
        1e-6,
    );

    let sgd = SgdConfig {
        lr: 0.1,
        momentum: Some(Momentum::Nesterov(0.9)),
        weight_decay: Some(WeightDecay::L2(0.01)),
    };
    let (mut mc, mut mg) = (start.clone(), start.to_device(&gpu));
    let (mut oc, mut og) = (Sgd::new(&mc, sgd), Sgd::new(&mg, sgd));
    run(&mut mc, &mut oc, 3);
    run(&mut mg, &mut og, 3);
    close("SGD weight", &mc.weight.as_vec(), &mg.weight.as_vec(), 1e-5);

    let mut gc = grads(&start, start.alloc_grads(), 0);
    let sg_model = start.to_device(&gpu);
    let mut gg = grads(&sg_model, sg_model.alloc_grads(), 0);
    let nc = clip_grad_norm(&mut gc, &start, 0.05).unwrap();
    let ng = clip_grad_norm(&mut gg, &sg_model, 0.05).unwrap();
    close("clip_grad_norm norm", &[nc as f32], &[ng as f32], 1e-5);
    close(
        "clip_grad_norm weight grad",
        &gc.get(&start.weight).as_vec(),
        &gg.get(&sg_model.weight).as_vec(),
        1e-6,
    );
}

#[test]
fn optimizer_state_round_trips_on_the_gpu() {
    let gpu = Cuda::default();
    let start = Cpu::seed_from_u64(3)
        .build_module::<Linear<8, 4>, f32>()
        .to_device(&gpu);
    let cfg = adamw(1e-2, 0.1);
    let mut m = start.clone();
    let mut opt = Adam::new(&m, cfg);
    run(&mut m, &mut opt, 2);
    let state = opt.state(&m).unwrap();

    let mut resumed_model = m.clone();
    let mut resumed = Adam::new(&resumed_model, cfg);
    let reloaded: OptimizerState<f32> = state.clone();
    resumed.load_state(&resumed_model, &reloaded).unwrap();
    assert_eq!(resumed.state(&resumed_model).unwrap(), state);

    // One more step each, same gradients: bit for bit the same.
    let mut g = grads(&m, m.alloc_grads(), 2);
    opt.step(&mut m, &mut g).unwrap();
    let mut g = grads(&resumed_model, resumed_model.alloc_grads(), 2);
    resumed.step(&mut resumed_model, &mut g).unwrap();
    assert_eq!(m.weight.as_vec(), resumed_model.weight.as_vec());
    assert_eq!(m.bias.as_vec(), resumed_model.bias.as_vec());
    eprintln!("Adam state round trip on CUDA: exact");
}
