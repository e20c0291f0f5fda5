//! Layer normalisation over the last dimension.

use super::LayerInfo;
use crate::Elem;
use dfdx::nn::{
    BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection, TensorOptions,
};
use dfdx::shapes::{Axis, Const, Dim, Dtype, HasShape, Rank1};
use dfdx::tensor::{Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, Device, TryAdd, TryMul};

/// `y = (x - mean(x)) / √(var(x) + ε) · weight + bias` over the last dimension, `ε = 1e-5`,
/// with the biased variance: `[*, M] -> [*, M]`.
///
/// Parameters `weight` (ones) and `bias` (zeros), both `[M]`, named as in PyTorch and Hugging
/// Face checkpoints. PyTorch: `torch.nn.LayerNorm(M)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let ln = dev.build_module::<LayerNorm<2>, f32>();
/// let y = ln.forward(dev.tensor([[1.0f32, 3.0]]));
/// assert!((y.array()[0][0] + 1.0).abs() < 1e-4);
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerNorm<const M: usize>;

/// The built [`LayerNorm`].
#[derive(Debug, Clone)]
pub struct LayerNormModule<const M: usize, E: Dtype, D: Storage<E>> {
    /// Scale, initialised to ones.
    pub weight: Tensor<Rank1<M>, E, D>,
    /// Shift, initialised to zeros.
    pub bias: Tensor<Rank1<M>, E, D>,
    /// Added to the variance; PyTorch's default.
    pub eps: f64,
}

impl<const M: usize> LayerInfo for LayerNorm<M> {
    const PARAMS: usize = 2 * M;
}

impl<const M: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E> for LayerNorm<M> {
    type Built = LayerNormModule<M, E, D>;
}

impl<const M: usize, E: Dtype, D: Storage<E>> NonMutableModule for LayerNormModule<M, E, D> {}

impl<const M: usize, E: Elem, D: Device<E>> TensorCollection<E, D> for LayerNormModule<M, E, D> {
    type To<E2: Dtype, D2: Device<E2>> = LayerNormModule<M, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::tensor(
                    "weight",
                    |s| &s.weight,
                    |s| &mut s.weight,
                    TensorOptions::reset_to_ones(),
                ),
                Self::tensor(
                    "bias",
                    |s| &s.bias,
                    |s| &mut s.bias,
                    TensorOptions::reset_to_zeros(),
                ),
            ),
            |(weight, bias)| LayerNormModule {
                weight,
                bias,
                eps: 1e-5,
            },
        )
    }
}

macro_rules! layer_norm_rank {
    ($ax:literal, [$($d:ident),*], |$w:ident, $shape:ident| $bcast:expr) => {
        impl<const M: usize, $($d: Dim,)* E: Dtype, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)* Const<M>,), E, D, T>> for LayerNormModule<M, E, D>
        {
            type Output = Tensor<($($d,)* Const<M>,), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<($($d,)* Const<M>,), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let $shape = *x.shape();
                let w = {
                    let $w = self.weight.retaped::<T>();
                    $bcast
                };
                let b = {
                    let $w = self.bias.retaped::<T>();
                    $bcast
                };
                x.try_normalize::<Axis<$ax>>(self.eps)?.try_mul(w)?.try_add(b)
            }
        }
    };
}
layer_norm_rank!(0, [], |w, _shape| w);
layer_norm_rank!(1, [B], |w, shape| w.try_broadcast_like(&shape)?);
layer_norm_rank!(2, [B, S], |w, shape| w.try_broadcast_like(&shape)?);
layer_norm_rank!(3, [B, S, U], |w, shape| w.try_broadcast_like(&shape)?);

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[test]
    fn normalises_the_last_dimension() {
        let dev = Cpu::default();
        let mut ln = dev.build_module::<LayerNorm<4>, f64>();
        ln.weight = dev.tensor([1.0, 2.0, 1.0, 1.0]);
        ln.bias = dev.tensor([0.0, 0.0, 0.0, 1.0]);
        let x = dev.tensor([[[1.0, 2.0, 3.0, 4.0]]]);
        let y = ln.forward(x).array()[0][0];
        let sd = (1.25f64 + 1e-5).sqrt();
        let want = [-1.5 / sd, 2.0 * -0.5 / sd, 0.5 / sd, 1.5 / sd + 1.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{y:?} vs {want:?}");
        }
    }
}
