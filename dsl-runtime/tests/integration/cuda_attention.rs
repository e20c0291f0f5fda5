//! The attention family, RoPE and SwiGLU on CUDA against the CPU: outputs, the gradients of every
//! parameter and input, the padding mask (an all-padding sequence included), and cached
//! generation. Compiled only with the `cuda` feature; needs a GPU to run.
#![cfg(feature = "cuda")]

use neural_arch::dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorOptions, TensorVisitor, ViewTensorName, ViewTensorRef,
};
use neural_arch::prelude::*;

use crate::common::close;

/// Every parameter's gradient, by name.
fn grads_by_name<M: TensorCollection<f32, D>, D: Device<f32>>(
    m: &M,
    g: &Gradients<f32, D>,
) -> Vec<(String, Vec<f32>)> {
    struct Collect<'a, D: Device<f32>>(&'a Gradients<f32, D>, Vec<(String, Vec<f32>)>);
    impl<D: Device<f32>> TensorVisitor<f32, D> for Collect<'_, D> {
        type Viewer = (ViewTensorRef, ViewTensorName);
        type Err = D::Err;
        type E2 = f32;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            _: TensorOptions<S, f32, D>,
            (t, name): (&Tensor<S, f32, D>, String),
        ) -> Result<Option<Tensor<S, f32, D>>, D::Err> {
            self.1.push((name, self.0.get(t).as_vec()));
            Ok(None)
        }
    }
    let mut c = Collect(g, Vec::new());
    M::iter_tensors(&mut RecursiveWalker {
        m: (m, String::new()),
        f: &mut c,
    })
    .unwrap();
    c.1
}

fn compare_grads<M: TensorCollection<f32, Cpu>, N: TensorCollection<f32, Cuda>>(
    layer: &str,
    m_cpu: &M,
    g_cpu: &Gradients<f32, Cpu>,
    m_gpu: &N,
    g_gpu: &Gradients<f32, Cuda>,
) {
    let a = grads_by_name(m_cpu, g_cpu);
    let b = grads_by_name(m_gpu, g_gpu);
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        close(&format!("{layer} grad {name}"), x, y, 1e-4);
    }
}

/// A layer with one input `[2, 5, 16]`: forward and every gradient, CPU against CUDA.
macro_rules! one_input {
    ($name:literal, $layer:ty) => {{
        let cpu = Cpu::seed_from_u64(1);
        let cuda = Cuda::default();
        let m_cpu = cpu.build_module::<$layer, f32>();
        let m_gpu = m_cpu.clone().to_device(&cuda);
        let x: Tensor<Rank3<2, 5, 16>, f32, Cpu> = cpu.sample_normal();
        let g: Tensor<Rank3<2, 5, 16>, f32, Cpu> = cpu.sample_normal();
        let (xg, gg) = (x.to_device(&cuda), g.to_device(&cuda));
        close(
            concat!($name, " forward"),
            &m_cpu.forward(x.clone()).as_vec(),
            &m_gpu.forward(xg.clone()).as_vec(),
            1e-5,
        );
        let gc = (m_cpu.forward(x.leaky_trace()) * g)
            .sum::<Rank0, _>()
            .backward();
        let gd = (m_gpu.forward(xg.leaky_trace()) * gg)
            .sum::<Rank0, _>()
            .backward();
        close(
            concat!($name, " grad x"),
            &gc.get(&x).as_vec(),
            &gd.get(&xg).as_vec(),
            1e-4,
        );
        compare_grads($name, &m_cpu, &gc, &m_gpu, &gd);
        (m_cpu, m_gpu, x, xg)
    }};
}

#[test]
fn self_attention_causal_gqa_and_swiglu_match_the_cpu() {
    one_input!("SelfAttention", SelfAttention<16, 4>);
    one_input!("SwiGLU", SwiGLU<16, 24>);
    let (m_cpu, m_gpu, x, xg) = one_input!("CausalSelfAttention", CausalSelfAttention<16, 4>);
    cached_equals_full(
        "CausalSelfAttention",
        |x, c| m_cpu.try_forward_cached(x, c),
        |x, c| m_gpu.try_forward_cached(x, c),
        x,
        xg,
    );
    let (m_cpu, m_gpu, x, xg) = one_input!("GqaAttention", GqaAttention<16, 4, 2, 4>);
    cached_equals_full(
        "GqaAttention",
        |x, c| m_cpu.try_forward_cached(x, c),
        |x, c| m_gpu.try_forward_cached(x, c),
        x,
        xg,
    );
}

type Piece<D> = Tensor<(Const<2>, usize, Const<16>), f32, D>;

/// Generation on CUDA, token blocks of 2, 1 and 2, against the CPU's cached generation.
fn cached_equals_full(
    layer: &str,
    cpu: impl Fn(Piece<Cpu>, &mut KvCache<f32, Cpu>) -> Result<Piece<Cpu>, ModelError>,
    gpu: impl Fn(Piece<Cuda>, &mut KvCache<f32, Cuda>) -> Result<Piece<Cuda>, ModelError>,
    x: Tensor<Rank3<2, 5, 16>, f32, Cpu>,
    xg: Tensor<Rank3<2, 5, 16>, f32, Cuda>,
) {
    let (mut cc, mut cg) = (KvCache::new(), KvCache::new());
    for (a, b) in [(0, 2), (2, 3), (3, 5)] {
        let yc = cpu(x.clone().slice((.., a..b, ..)), &mut cc).unwrap();
        let yg = gpu(xg.clone().slice((.., a..b, ..)), &mut cg).unwrap();
        close(
            &format!("{layer} cached {a}..{b}"),
            &yc.as_vec(),
            &yg.as_vec(),
            1e-5,
        );
    }
}

#[test]
fn masked_and_cross_attention_and_rope_match_the_cpu() {
    let cpu = Cpu::seed_from_u64(2);
    let cuda = Cuda::default();
    let mask_c = cpu.tensor([
        [true, true, false, true, false],
        [false, false, false, false, false],
    ]);
    let mask_g = mask_c.to_device(&cuda);

    let m_cpu = cpu.build_module::<SelfAttention<16, 4>, f32>();
    let m_gpu = m_cpu.clone().to_device(&cuda);
    let x: Tensor<Rank3<2, 5, 16>, f32, Cpu> = cpu.sample_normal();
    let xg = x.to_device(&cuda);
    let g: Tensor<Rank3<2, 5, 16>, f32, Cpu> = cpu.sample_normal();
    let gg = g.to_device(&cuda);
    let yc = m_cpu.forward((x.leaky_trace(), mask_c.clone()));
    let yg = m_gpu.forward((xg.leaky_trace(), mask_g.clone()));
    close(
        "SelfAttention masked forward",
        &yc.as_vec(),
        &yg.as_vec(),
        1e-5,
    );
    let gc = (yc * g.clone()).sum::<Rank0, _>().backward();
    let gd = (yg * gg.clone()).sum::<Rank0, _>().backward();
    close(
        "SelfAttention masked grad x",
        &gc.get(&x).as_vec(),
        &gd.get(&xg).as_vec(),
        1e-4,
    );
    compare_grads("SelfAttention masked", &m_cpu, &gc, &m_gpu, &gd);

    let m_cpu = cpu.build_module::<CrossAttention<16, 4>, f32>();
    let m_gpu = m_cpu.clone().to_device(&cuda);
    let q: Tensor<Rank3<2, 3, 16>, f32, Cpu> = cpu.sample_normal();
    let qg = q.to_device(&cuda);
    let gq: Tensor<Rank3<2, 3, 16>, f32, Cpu> = cpu.sample_normal();
    let gqg = gq.to_device(&cuda);
    let yc = m_cpu.forward((q.leaky_trace(), x.leaky_trace(), mask_c));
    let yg = m_gpu.forward((qg.leaky_trace(), xg.leaky_trace(), mask_g));
    close(
        "CrossAttention masked forward",
        &yc.as_vec(),
        &yg.as_vec(),
        1e-5,
    );
    let gc = (yc * gq).sum::<Rank0, _>().backward();
    let gd = (yg * gqg).sum::<Rank0, _>().backward();
    close(
        "CrossAttention grad q",
        &gc.get(&q).as_vec(),
        &gd.get(&qg).as_vec(),
        1e-4,
    );
    close(
        "CrossAttention grad kv",
        &gc.get(&x).as_vec(),
        &gd.get(&xg).as_vec(),
        1e-4,
    );
    compare_grads("CrossAttention", &m_cpu, &gc, &m_gpu, &gd);

    let x4: Tensor<Rank4<2, 3, 5, 8>, f32, Cpu> = cpu.sample_normal();
    let x4g = x4.to_device(&cuda);
    let yc = Rope::<8>.forward((x4.leaky_trace(), 7));
    let yg = Rope::<8>.forward((x4g.leaky_trace(), 7));
    close("Rope forward", &yc.as_vec(), &yg.as_vec(), 1e-5);
    let gc = yc.square().sum::<Rank0, _>().backward();
    let gd = yg.square().sum::<Rank0, _>().backward();
    close(
        "Rope grad x",
        &gc.get(&x4).as_vec(),
        &gd.get(&x4g).as_vec(),
        1e-4,
    );
}
