//! Embedding, PositionalEmbedding, RMSNorm and BatchNorm2d on CUDA (dfdx op compositions)
//! against the CPU (fused kernels): outputs, the gradients of the input and every parameter, the
//! running statistics, and the bad-input errors. Compiled only with the `cuda` feature; needs a
//! GPU to run.
#![cfg(feature = "cuda")]

use neural_arch::prelude::*;
use neural_arch::Error;

use crate::common::close;

#[test]
fn embeddings_match_the_cpu() {
    let (cpu, cuda) = (Cpu::seed_from_u64(1), Cuda::default());
    let wte = cpu.build_module::<Embedding<50, 16>, f32>();
    let wte_gpu = wte.to_device(&cuda);
    let ids = cpu.tensor_from_vec(vec![3, 7, 3, 49, 0, 7, 7, 1, 2, 3], (2usize, 5usize));
    let g: Tensor<(usize, usize, Const<16>), f32, Cpu> = cpu.sample_normal_like(&(2, 5, Const));
    let y = wte.forward(ids.trace(wte.alloc_grads()));
    let y_gpu = wte_gpu.forward(ids.to_device(&cuda).trace(wte_gpu.alloc_grads()));
    close("Embedding forward", &y.as_vec(), &y_gpu.as_vec(), 1e-6);
    let gr = (y * g.clone()).sum::<Rank0, _>().backward();
    let gr_gpu = (y_gpu * g.to_device(&cuda)).sum::<Rank0, _>().backward();
    close(
        "Embedding grad weight",
        &gr.get(&wte.weight).as_vec(),
        &gr_gpu.get(&wte_gpu.weight).as_vec(),
        1e-5,
    );
    let bad = cuda.tensor_from_vec(vec![1, 50], (2usize,));
    assert!(matches!(
        wte_gpu.try_forward(bad).map(|_| ()),
        Err(Error::TokenOutOfRange {
            id: 50,
            position: 1,
            vocab: 50
        })
    ));

    let wpe = cpu.build_module::<PositionalEmbedding<8, 16>, f32>();
    let wpe_gpu = wpe.to_device(&cuda);
    let x: Tensor<(usize, usize, Const<16>), f32, Cpu> = cpu.sample_normal_like(&(2, 5, Const));
    let x_gpu = x.to_device(&cuda);
    let y = wpe.forward(x.leaky_trace());
    let y_gpu = wpe_gpu.forward(x_gpu.leaky_trace());
    close(
        "PositionalEmbedding forward",
        &y.as_vec(),
        &y_gpu.as_vec(),
        1e-6,
    );
    let gr = (y * g.clone()).sum::<Rank0, _>().backward();
    let gr_gpu = (y_gpu * g.to_device(&cuda)).sum::<Rank0, _>().backward();
    close(
        "PositionalEmbedding grad x",
        &gr.get(&x).as_vec(),
        &gr_gpu.get(&x_gpu).as_vec(),
        1e-6,
    );
    close(
        "PositionalEmbedding grad weight",
        &gr.get(&wpe.weight).as_vec(),
        &gr_gpu.get(&wpe_gpu.weight).as_vec(),
        1e-5,
    );
    let long: Tensor<(usize, Const<16>), f32, Cuda> = cuda.zeros_like(&(9, Const));
    assert!(matches!(wpe_gpu.try_forward(long), Err(Error::Shape(_))));
}

#[test]
fn rms_norm_matches_the_cpu() {
    let (cpu, cuda) = (Cpu::seed_from_u64(2), Cuda::default());
    let mut norm = cpu.build_module::<RMSNorm<16>, f32>();
    norm.weight = cpu.sample_normal();
    let norm_gpu = norm.to_device(&cuda);
    let x: Tensor<(usize, usize, Const<16>), f32, Cpu> = cpu.sample_normal_like(&(2, 5, Const));
    let g: Tensor<(usize, usize, Const<16>), f32, Cpu> = cpu.sample_normal_like(&(2, 5, Const));
    let x_gpu = x.to_device(&cuda);
    let y = norm.forward(x.leaky_trace());
    let y_gpu = norm_gpu.forward(x_gpu.leaky_trace());
    close("RMSNorm forward", &y.as_vec(), &y_gpu.as_vec(), 1e-5);
    let gr = (y * g.clone()).sum::<Rank0, _>().backward();
    let gr_gpu = (y_gpu * g.to_device(&cuda)).sum::<Rank0, _>().backward();
    close(
        "RMSNorm grad x",
        &gr.get(&x).as_vec(),
        &gr_gpu.get(&x_gpu).as_vec(),
        1e-4,
    );
    close(
        "RMSNorm grad weight",
        &gr.get(&norm.weight).as_vec(),
        &gr_gpu.get(&norm_gpu.weight).as_vec(),
        1e-4,
    );
}

#[test]
fn batch_norm_matches_the_cpu_in_training_and_evaluation() {
    let (cpu, cuda) = (Cpu::seed_from_u64(3), Cuda::default());
    let mut bn = cpu.build_module::<BatchNorm2d<3>, f32>();
    bn.weight = cpu.sample_normal();
    bn.bias = cpu.sample_normal();
    let mut bn_gpu = bn.to_device(&cuda);
    type Img = (usize, Const<3>, usize, usize);
    for (step, training) in [(0, true), (1, true), (2, false)] {
        let x: Tensor<Img, f32, Cpu> = cpu.sample_normal_like(&(4, Const, 5, 6));
        let g: Tensor<Img, f32, Cpu> = cpu.sample_normal_like(&(4, Const, 5, 6));
        let x_gpu = x.to_device(&cuda);
        let (y, y_gpu) = if training {
            (
                bn.forward_mut(x.leaky_trace()),
                bn_gpu.forward_mut(x_gpu.leaky_trace()),
            )
        } else {
            (
                bn.forward(x.leaky_trace()),
                bn_gpu.forward(x_gpu.leaky_trace()),
            )
        };
        let at = |w: &str| format!("BatchNorm2d step {step} (training: {training}) {w}");
        close(&at("forward"), &y.as_vec(), &y_gpu.as_vec(), 1e-5);
        let gr = (y * g.clone()).sum::<Rank0, _>().backward();
        let gr_gpu = (y_gpu * g.to_device(&cuda)).sum::<Rank0, _>().backward();
        close(
            &at("grad x"),
            &gr.get(&x).as_vec(),
            &gr_gpu.get(&x_gpu).as_vec(),
            1e-4,
        );
        for (name, a, b) in [
            ("grad weight", &bn.weight, &bn_gpu.weight),
            ("grad bias", &bn.bias, &bn_gpu.bias),
        ] {
            close(
                &at(name),
                &gr.get(a).as_vec(),
                &gr_gpu.get(b).as_vec(),
                1e-4,
            );
        }
        close(
            &at("running_mean"),
            &bn.running_mean.as_vec(),
            &bn_gpu.running_mean.as_vec(),
            1e-6,
        );
        close(
            &at("running_var"),
            &bn.running_var.as_vec(),
            &bn_gpu.running_var.as_vec(),
            1e-5,
        );
    }
    let one: Tensor<Img, f32, Cuda> = cuda.ones_like(&(1, Const, 1, 1));
    assert!(matches!(bn_gpu.try_forward_mut(one), Err(Error::Shape(_))));
}
