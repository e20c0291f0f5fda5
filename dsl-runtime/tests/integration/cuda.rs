//! The same `model!` network on CUDA and on the CPU: outputs, gradients and an optimizer step
//! agree. Compiled only with the `cuda` feature; needs a GPU to run.
#![cfg(feature = "cuda")]

use neural_arch::prelude::*;

model! {
    /// A pre-norm block with a residual and an element-wise gate: every kind of generated step.
    pub struct Block<const D: usize, const F: usize> {
        ln: LayerNorm<D>,
        up: Linear<D, F>,
        gate: Linear<D, F>,
        act: SiLU,
        down: LinearNoBias<F, D>,
        drop: Dropout<0>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let h = ln(x);
        x + drop(down(act(gate(h)) * up(h)))
    }
}

model! {
    /// Repeated blocks, attention and a head.
    pub struct Net<const D: usize> {
        proj: Linear<5, D>,
        blocks: [Block<D, 32>; 2],
        attn: SelfAttention<D, 4>,
        head: Linear<D, 3>,
        act: GeluTanh,
    }
}

use crate::common::close;

#[test]
fn cuda_matches_cpu_forward_backward_and_step() {
    let cpu = Cpu::seed_from_u64(11);
    let cuda = Cuda::default();
    let mut m_cpu = cpu.build_module::<Net<16>, f32>();
    let mut m_gpu = m_cpu.clone().to_device(&cuda);
    assert_eq!(m_gpu.num_trainable_params(), Net::<16>::PARAMS);

    let x_cpu: Tensor<Rank3<4, 7, 5>, f32, Cpu> = cpu.sample_normal();
    let x_gpu = x_cpu.clone().to_device(&cuda);
    close(
        "forward",
        &m_cpu.forward(x_cpu.clone()).as_vec(),
        &m_gpu.forward(x_gpu.clone()).as_vec(),
        1e-4,
    );

    let g_cpu = m_cpu
        .forward_mut(x_cpu.trace(m_cpu.alloc_grads()))
        .square()
        .mean::<Rank0, _>()
        .backward();
    let g_gpu = m_gpu
        .forward_mut(x_gpu.trace(m_gpu.alloc_grads()))
        .square()
        .mean::<Rank0, _>()
        .backward();
    close(
        "grad proj.weight",
        &g_cpu.get(&m_cpu.proj.weight).as_vec(),
        &g_gpu.get(&m_gpu.proj.weight).as_vec(),
        1e-4,
    );
    close(
        "grad blocks.1.up.weight",
        &g_cpu.get(&m_cpu.blocks[1].up.weight).as_vec(),
        &g_gpu.get(&m_gpu.blocks[1].up.weight).as_vec(),
        1e-4,
    );
    close(
        "grad blocks.0.ln.weight",
        &g_cpu.get(&m_cpu.blocks[0].ln.weight).as_vec(),
        &g_gpu.get(&m_gpu.blocks[0].ln.weight).as_vec(),
        1e-4,
    );
    close(
        "grad head.bias",
        &g_cpu.get(&m_cpu.head.bias).as_vec(),
        &g_gpu.get(&m_gpu.head.bias).as_vec(),
        1e-4,
    );

    let mut o_cpu = Adam::new(&m_cpu, AdamConfig::default());
    let mut o_gpu = Adam::new(&m_gpu, AdamConfig::default());
    o_cpu
        .update(&mut m_cpu, &g_cpu)
        .expect("all parameters have gradients");
    o_gpu
        .update(&mut m_gpu, &g_gpu)
        .expect("all parameters have gradients");
    close(
        "after Adam: blocks.0.down.weight",
        &m_cpu.blocks[0].down.weight.as_vec(),
        &m_gpu.blocks[0].down.weight.as_vec(),
        1e-5,
    );
    close(
        "after Adam: forward",
        &m_cpu.forward(x_cpu).as_vec(),
        &m_gpu.forward(x_gpu).as_vec(),
        1e-4,
    );
}

#[test]
fn builds_directly_on_cuda_in_f32_and_f16() {
    use neural_arch::dfdx::dtypes::f16;
    let cuda = Cuda::default();
    let m32 = cuda.build_module::<Net<16>, f32>();
    let m16 = m32.clone().to_dtype::<f16>();
    let x: Tensor<Rank3<2, 3, 5>, f32, Cuda> = cuda.sample_normal();
    let y32 = m32.forward(x.clone()).as_vec();
    let y16: Vec<f32> = m16
        .forward(x.to_dtype::<f16>())
        .as_vec()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    close("f16 vs f32 on cuda", &y32, &y16, 5e-2);
}
