//! The SwiGLU feed-forward block of Llama.

use super::LayerInfo;
use super::LinearNoBiasModule as UnbiasedLinear;
use crate::Elem;
use dfdx::nn::{BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection};
use dfdx::shapes::{Const, Dim, Dtype};
use dfdx::tensor::{Storage, Tape, Tensor};
use dfdx::tensor_ops::{Device, TryMul};

/// The gated feed-forward block of Llama (Shazeer, GLU Variants Improve Transformer,
/// <https://arxiv.org/abs/2002.05202>): `[*, M] -> [*, M]` through a hidden width `F`,
///
/// `y = down_proj(silu(gate_proj(x)) ⊙ up_proj(x))`, `silu(z) = z·σ(z)`.
///
/// Parameters named as in Hugging Face's `LlamaMLP`, no biases: `gate_proj.weight` and
/// `up_proj.weight` `[F, M]`, `down_proj.weight` `[M, F]`.
///
/// # Shapes
/// `x: [B, S, M]`, `[B, M]` or `[M]` → same shape.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let mlp = dev.build_module::<SwiGLU<8, 24>, f32>();
/// let x: Tensor<Rank3<2, 3, 8>, f32, _> = dev.sample_normal();
/// let y = mlp.forward(x);
/// assert_eq!(y.shape().2, Const::<8>);
/// assert_eq!(<SwiGLU<8, 24> as LayerInfo>::PARAMS, 3 * 8 * 24);
/// ```
///
/// PyTorch: `down_proj(F.silu(gate_proj(x)) * up_proj(x))` with three `torch.nn.Linear(..,
/// bias=False)`; Hugging Face `transformers`: `LlamaMLP` with `hidden_act="silu"`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SwiGLU<const M: usize, const F: usize>;

/// The built [`SwiGLU`].
#[derive(Debug, Clone)]
pub struct SwiGLUModule<const M: usize, const F: usize, E: Dtype, D: Storage<E>> {
    /// The gate, `[F, M]`.
    pub gate_proj: UnbiasedLinear<M, F, E, D>,
    /// The value, `[F, M]`.
    pub up_proj: UnbiasedLinear<M, F, E, D>,
    /// Back to the model width, `[M, F]`.
    pub down_proj: UnbiasedLinear<F, M, E, D>,
}

impl<const M: usize, const F: usize> LayerInfo for SwiGLU<M, F> {
    const PARAMS: usize = 3 * M * F;
}

impl<const M: usize, const F: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E> for SwiGLU<M, F> {
    type Built = SwiGLUModule<M, F, E, D>;
}

impl<const M: usize, const F: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for SwiGLUModule<M, F, E, D>
{
}

impl<const M: usize, const F: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for SwiGLUModule<M, F, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = SwiGLUModule<M, F, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("gate_proj", |s| &s.gate_proj, |s| &mut s.gate_proj),
                Self::module("up_proj", |s| &s.up_proj, |s| &mut s.up_proj),
                Self::module("down_proj", |s| &s.down_proj, |s| &mut s.down_proj),
            ),
            |(gate_proj, up_proj, down_proj)| SwiGLUModule {
                gate_proj,
                up_proj,
                down_proj,
            },
        )
    }
}

macro_rules! swiglu_rank {
    ([$($d:ident),*]) => {
        impl<const M: usize, const F: usize, $($d: Dim,)* E: Elem, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)* Const<M>,), E, D, T>> for SwiGLUModule<M, F, E, D>
        {
            type Output = Tensor<($($d,)* Const<M>,), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<($($d,)* Const<M>,), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let gate = self.gate_proj.try_forward(x.retaped::<T>())?;
                let up = self.up_proj.try_forward(x)?;
                // The SiLU layer: one fused pass each way on the CPU.
                let act = super::SiLU.try_forward(gate)?;
                self.down_proj.try_forward(act.try_mul(up)?)
            }
        }
    };
}
swiglu_rank!([]);
swiglu_rank!([B]);
swiglu_rank!([B, S]);

#[cfg(test)]
mod tests {
    use crate::gradcheck::{check_input_grads, check_param_grads, named_grads, named_values};
    use crate::layers::attention::reference::{assert_close, case};
    use crate::prelude::*;

    type Dev = Cpu;

    #[test]
    fn matches_pytorch() {
        let dev = Dev::default();
        let c = case("swiglu");
        let mut m = SwiGLUModule::<4, 6, f64, Dev> {
            gate_proj: crate::layers::LinearNoBiasModule {
                weight: c.param_tensor(&dev, "gate_proj.weight", (Const, Const)),
            },
            up_proj: crate::layers::LinearNoBiasModule {
                weight: c.param_tensor(&dev, "up_proj.weight", (Const, Const)),
            },
            down_proj: crate::layers::LinearNoBiasModule {
                weight: c.param_tensor(&dev, "down_proj.weight", (Const, Const)),
            },
        };
        let x = c.tensor(&dev, "x", (Const::<2>, Const::<3>, Const::<4>));
        let g = dev.tensor_from_vec(c.g(), (Const::<2>, Const::<3>, Const::<4>));
        assert_close("y", &m.forward(x.clone()).as_vec(), &c.y(), 1e-12);
        let grads = (m.forward(x.leaky_trace()) * g)
            .sum::<Rank0, _>()
            .backward();
        assert_close("grad x", &grads.get(&x).as_vec(), &c.grad("x"), 1e-12);
        for (name, grad) in named_grads(&mut m, &grads) {
            assert_close(&format!("grad {name}"), &grad, &c.grad(&name), 1e-12);
        }
        // Rank 2 and rank 1 inputs: the same rows.
        let x2: Tensor<Rank2<6, 4>, f64, Dev> = dev.tensor_from_vec(c.input("x"), (Const, Const));
        assert_close("rank 2", &m.forward(x2).as_vec(), &c.y(), 1e-12);
        let x1: Tensor<Rank1<4>, f64, Dev> =
            dev.tensor_from_vec(c.input("x")[..4].to_vec(), (Const,));
        assert_close("rank 1", &m.forward(x1).as_vec(), &c.y()[..4], 1e-12);
    }

    #[test]
    fn gradients_match_central_differences() {
        let dev = Dev::seed_from_u64(11);
        let mut m = dev.build_module::<SwiGLU<8, 12>, f64>();
        let x: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let g: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let report = check_param_grads(&mut m, |m, grads| {
            (m.forward(x.trace(grads)) * g.clone()).sum()
        });
        assert_eq!(report.checked, <SwiGLU<8, 12> as LayerInfo>::PARAMS);
        assert!(report.max_abs_err <= 1e-6, "params: {report}");
        eprintln!("swiglu params: {report}");
        let report = check_input_grads(&x, |x| (m.forward(x) * g.clone()).sum());
        assert!(report.max_abs_err <= 1e-6, "input: {report}");
        eprintln!("swiglu input: {report}");
        assert_eq!(
            m.num_trainable_params(),
            <SwiGLU<8, 12> as LayerInfo>::PARAMS
        );
        let names: Vec<String> = named_values(&mut m).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
        );
    }
}
