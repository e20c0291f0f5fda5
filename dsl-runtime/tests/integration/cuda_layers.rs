//! The layers no other CUDA suite covers, the losses, and a mixed-precision step, on CUDA (dfdx
//! op compositions) against the CPU (fused kernels): outputs and the gradients of the input and
//! of every parameter. Compiled only with the `cuda` feature; needs a GPU to run.
#![cfg(feature = "cuda")]

use neural_arch::amp::{mixed_step, GradScaler, Half};
use neural_arch::dfdx::nn::{RecursiveWalker, TensorOptions, TensorVisitor, ViewTensorRef};
use neural_arch::prelude::*;

use crate::common::close;

model! {
    /// Every element-wise activation, a softmax and a log-softmax, each after a product.
    pub struct Activations {
        l1: Linear<8, 8>,
        gelu: Gelu,
        l2: Linear<8, 8>,
        quick: QuickGelu,
        l3: Linear<8, 8>,
        relu: ReLU,
        l4: Linear<8, 8>,
        sigmoid: Sigmoid,
        l5: Linear<8, 8>,
        tanh: Tanh,
        l6: Linear<8, 8>,
        softmax: Softmax,
        l7: LinearNoBias<8, 8>,
        log_softmax: LogSoftmax,
    }
    forward(x: [B, 8]) -> [B, 8];
}

model! {
    /// Class tokens, learned positions, scaled dot-product attention (plain and causal), a
    /// residual layer, the first token, and the reshaping layers.
    pub struct Tokens {
        cls: ClsToken<8>,
        class: ClassEmbedding<8>,
        pos: LearnedPositions<6, 8>,
        q: Linear<8, 8>,
        k: Linear<8, 8>,
        v: Linear<8, 8>,
        sdpa: ScaledDotProductAttention<2>,
        causal: ScaledDotProductAttention<2, true>,
        res: Residual<Linear<8, 8>>,
        first: FirstToken,
        up: Linear<8, 6>,
        unflat: Unflatten2<2, 3>,
        flat: Flatten<6>,
    }
    forward(x: [B, T, 8]) -> [B, 6] {
        let h = pos(class(cls(x)));
        let a = sdpa(q(h), k(h), v(h));
        let c = causal(q(a), k(a), v(a));
        flat(unflat(up(first(res(c)))))
    }
}

/// Every trainable tensor's gradient, in the walk's order.
fn param_grads<M: TensorCollection<f32, D>, D: Device<f32>>(
    m: &M,
    grads: &Gradients<f32, D>,
) -> Vec<Vec<f32>> {
    struct Walk<'a, D: Device<f32>> {
        grads: &'a Gradients<f32, D>,
        out: Vec<Vec<f32>>,
    }
    impl<D: Device<f32>> TensorVisitor<f32, D> for Walk<'_, D> {
        type Viewer = ViewTensorRef;
        type Err = D::Err;
        type E2 = f32;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, f32, D>,
            t: &Tensor<S, f32, D>,
        ) -> Result<Option<Tensor<S, f32, D>>, D::Err> {
            if opts.do_gradient_update {
                self.out.push(self.grads.get(t).as_vec());
            }
            Ok(None)
        }
    }
    let mut walk = Walk {
        grads,
        out: Vec::new(),
    };
    M::iter_tensors(&mut RecursiveWalker { m, f: &mut walk }).unwrap();
    walk.out
}

fn compare_grads(what: &str, a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: parameter count");
    assert!(!a.is_empty());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        close(&format!("{what}: gradient of parameter {i}"), x, y, tol);
    }
}

#[test]
fn activations_match_the_cpu() {
    let (cpu, cuda) = (Cpu::seed_from_u64(3), Cuda::default());
    let m = cpu.build_module::<Activations, f32>();
    let m_gpu = m.to_device(&cuda);
    let x: Tensor<(usize, Const<8>), f32, Cpu> = cpu.sample_normal_like(&(6, Const));
    let x_gpu = x.to_device(&cuda);
    let g: Tensor<(usize, Const<8>), f32, Cpu> = cpu.sample_normal_like(&(6, Const));
    let y = m.forward(x.leaky_trace());
    let y_gpu = m_gpu.forward(x_gpu.leaky_trace());
    close("activations forward", &y.as_vec(), &y_gpu.as_vec(), 1e-5);
    let gr = (y * g.clone()).sum::<Rank0, _>().backward();
    let gr_gpu = (y_gpu * g.to_device(&cuda)).sum::<Rank0, _>().backward();
    close(
        "activations grad x",
        &gr.get(&x).as_vec(),
        &gr_gpu.get(&x_gpu).as_vec(),
        1e-5,
    );
    compare_grads(
        "activations",
        &param_grads(&m, &gr),
        &param_grads(&m_gpu, &gr_gpu),
        1e-5,
    );
}

#[test]
fn tokens_attention_and_reshapes_match_the_cpu() {
    let (cpu, cuda) = (Cpu::seed_from_u64(4), Cuda::default());
    let mut m = cpu.build_module::<Tokens, f32>();
    m.cls.token = cpu.sample_normal();
    let m_gpu = m.to_device(&cuda);
    let x: Tensor<(usize, usize, Const<8>), f32, Cpu> = cpu.sample_normal_like(&(3, 4, Const));
    let x_gpu = x.to_device(&cuda);
    let g: Tensor<(usize, Const<6>), f32, Cpu> = cpu.sample_normal_like(&(3, Const));
    let y = m.forward(x.leaky_trace());
    let y_gpu = m_gpu.forward(x_gpu.leaky_trace());
    close("tokens forward", &y.as_vec(), &y_gpu.as_vec(), 1e-5);
    let gr = (y * g.clone()).sum::<Rank0, _>().backward();
    let gr_gpu = (y_gpu * g.to_device(&cuda)).sum::<Rank0, _>().backward();
    close(
        "tokens grad x",
        &gr.get(&x).as_vec(),
        &gr_gpu.get(&x_gpu).as_vec(),
        1e-5,
    );
    compare_grads(
        "tokens",
        &param_grads(&m, &gr),
        &param_grads(&m_gpu, &gr_gpu),
        1e-5,
    );
}

#[test]
fn losses_match_the_cpu() {
    let (cpu, cuda) = (Cpu::seed_from_u64(5), Cuda::default());
    let x: Tensor<(usize, Const<50>), f32, Cpu> = cpu.sample_normal_like(&(12, Const));
    let x_gpu = x.to_device(&cuda);
    let targets: Vec<usize> = (0..12)
        .map(|i| if i == 4 { 49 } else { (i * 7) % 50 })
        .collect();
    for (label_smoothing, ignore_index) in [(0.0, None), (0.1, Some(49))] {
        let opts = CrossEntropy {
            ignore_index,
            label_smoothing,
        };
        let loss = cross_entropy(x.leaky_trace(), &targets, opts).unwrap();
        let loss_gpu = cross_entropy(x_gpu.leaky_trace(), &targets, opts).unwrap();
        close("cross_entropy", &[loss.array()], &[loss_gpu.array()], 1e-5);
        close(
            "cross_entropy grad",
            &loss.backward().get(&x).as_vec(),
            &loss_gpu.backward().get(&x_gpu).as_vec(),
            1e-6,
        );
    }
    let t: Tensor<(usize, Const<50>), f32, Cpu> = cpu.sample_uniform_like(&(12, Const));
    let t_gpu = t.to_device(&cuda);
    let loss = bce_with_logits(x.leaky_trace(), t.clone()).unwrap();
    let loss_gpu = bce_with_logits(x_gpu.leaky_trace(), t_gpu.clone()).unwrap();
    close("bce", &[loss.array()], &[loss_gpu.array()], 1e-5);
    close(
        "bce grad",
        &loss.backward().get(&x).as_vec(),
        &loss_gpu.backward().get(&x_gpu).as_vec(),
        1e-6,
    );
    let loss = mse(x.leaky_trace(), t).unwrap();
    let loss_gpu = mse(x_gpu.leaky_trace(), t_gpu).unwrap();
    close("mse", &[loss.array()], &[loss_gpu.array()], 1e-5);
    close(
        "mse grad",
        &loss.backward().get(&x).as_vec(),
        &loss_gpu.backward().get(&x_gpu).as_vec(),
        1e-6,
    );
}

#[test]
fn a_mixed_precision_step_matches_the_cpu() {
    let (cpu, cuda) = (Cpu::seed_from_u64(6), Cuda::default());
    let mut m = cpu.build_module::<Activations, f32>();
    let mut m_gpu = m.to_device(&cuda);
    let mut work = m.to_dtype::<Half>();
    let mut work_gpu = m_gpu.to_dtype::<Half>();
    let x: Tensor<(usize, Const<8>), f32, Cpu> = cpu.sample_normal_like(&(16, Const));
    let x_gpu = x.to_device(&cuda);
    let targets: Vec<usize> = (0..16).map(|i| (i * 3) % 8).collect();
    let scaler = GradScaler::default();
    let mut grads = m.alloc_grads();
    let out = mixed_step(&mut m, &mut work, &mut grads, &scaler, |h, g| {
        let y = h.try_forward(x.to_dtype::<Half>().traced(g))?;
        Ok((cross_entropy(y, &targets, Default::default())?, 16))
    })
    .unwrap();
    let mut grads_gpu = m_gpu.alloc_grads();
    let out_gpu = mixed_step(
        &mut m_gpu,
        &mut work_gpu,
        &mut grads_gpu,
        &scaler,
        |h, g| {
            let y = h.try_forward(x_gpu.to_dtype::<Half>().traced(g))?;
            Ok((cross_entropy(y, &targets, Default::default())?, 16))
        },
    )
    .unwrap();
    assert!(!out.found_inf && !out_gpu.found_inf);
    close(
        "mixed loss",
        &[out.loss as f32],
        &[out_gpu.loss as f32],
        1e-2,
    );
    // f16 rounds each side on its own: gradients agree to f16's precision, not f32's.
    compare_grads(
        "mixed",
        &param_grads(&m, &grads),
        &param_grads(&m_gpu, &grads_gpu),
        5e-3,
    );
}

#[test]
fn dropout_drops_what_the_cpu_drops() {
    let (cpu, cuda) = (Cpu::seed_from_u64(7), Cuda::default());
    let mut drop = cpu.build_module::<Dropout<30>, f32>();
    let mut drop_gpu = cuda.build_module::<Dropout<30>, f32>();
    let x: Tensor<(usize, Const<64>), f32, Cpu> = cpu.sample_normal_like(&(40, Const));
    let x_gpu = x.to_device(&cuda);
    let g: Tensor<(usize, Const<64>), f32, Cpu> = cpu.sample_normal_like(&(40, Const));
    // The masks are drawn on the host from the per-thread generator, whatever the device.
    seed_dropout(5);
    let y = drop.forward_mut(x.leaky_trace());
    seed_dropout(5);
    let y_gpu = drop_gpu.forward_mut(x_gpu.leaky_trace());
    let dropped = y.as_vec().iter().filter(|v| **v == 0.0).count();
    assert!(
        (600..1000).contains(&dropped),
        "{dropped} of 2560 dropped at p = 0.3"
    );
    close("dropout forward", &y.as_vec(), &y_gpu.as_vec(), 1e-6);
    let gr = (y * g.clone()).sum::<Rank0, _>().backward();
    let gr_gpu = (y_gpu * g.to_device(&cuda)).sum::<Rank0, _>().backward();
    close(
        "dropout grad x",
        &gr.get(&x).as_vec(),
        &gr_gpu.get(&x_gpu).as_vec(),
        1e-6,
    );
}
