//! A learned offset on its own: the output bias of BERT's tied masked-LM decoder.

use super::LayerInfo;
use crate::Elem;
use dfdx::nn::{
    BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection, TensorOptions,
};
use dfdx::shapes::{Const, Dim, Dtype, HasShape, Rank1};
use dfdx::tensor::{Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, Device, TryAdd};

/// `y = x + bias` along the last dimension: a learned offset that is not part of a linear
/// layer, as when the weight of the layer is tied to an embedding (BERT's masked-LM decoder
/// reuses `word_embeddings` and keeps its own bias, <https://arxiv.org/abs/1810.04805>).
///
/// # Shapes
/// `[M] -> [M]`, `[B, M] -> [B, M]` and `[B, T, M] -> [B, T, M]`.
///
/// Parameter: the tensor itself, `[M]`, keyed by the field name (Hugging Face BERT's
/// `cls.predictions.bias`), initialised to zeros as there.
///
/// PyTorch: `x + nn.Parameter(torch.zeros(M))`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let mut b = dev.build_module::<Bias<2>, f32>();
/// b.bias = dev.tensor([1.0, -1.0]);
/// assert_eq!(b.forward(dev.tensor([[0.5f32, 0.5]])).array(), [[1.5, -0.5]]);
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bias<const M: usize>;

/// The built [`Bias`].
#[derive(Debug, Clone)]
pub struct BiasModule<const M: usize, E: Dtype, D: Storage<E>> {
    /// The offset, `[M]`, zeros at initialisation.
    pub bias: Tensor<Rank1<M>, E, D>,
}

impl<const M: usize> LayerInfo for Bias<M> {
    const PARAMS: usize = M;
}

impl<const M: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E> for Bias<M> {
    type Built = BiasModule<M, E, D>;
}

impl<const M: usize, E: Dtype, D: Storage<E>> NonMutableModule for BiasModule<M, E, D> {}

impl<const M: usize, E: Elem, D: Device<E>> TensorCollection<E, D> for BiasModule<M, E, D> {
    type To<E2: Dtype, D2: Device<E2>> = BiasModule<M, E2, D2>;
    fn iter_tensors<W: ModuleVisitor<Self, E, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            // Named "": the key is the field's own name, as upstream stores it.
            Self::tensor(
                "",
                |s| &s.bias,
                |s| &mut s.bias,
                TensorOptions::reset_to_zeros(),
            ),
            |bias| BiasModule { bias },
        )
    }
}

macro_rules! bias_rank {
    ([$($d:ident),*], |$b:ident, $shape:ident| $bcast:expr) => {
        impl<const M: usize, $($d: Dim,)* E: Dtype, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)* Const<M>,), E, D, T>> for BiasModule<M, E, D>
        {
            type Output = Tensor<($($d,)* Const<M>,), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<($($d,)* Const<M>,), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let $shape = *x.shape();
                let $b = self.bias.retaped::<T>();
                x.try_add($bcast)
            }
        }
    };
}
bias_rank!([], |b, _shape| b);
bias_rank!([B], |b, shape| b.try_broadcast_like(&shape)?);
bias_rank!([B, S], |b, shape| b.try_broadcast_like(&shape)?);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tensor_names;
    use crate::gradcheck::check_param_grads;
    use crate::prelude::*;

    #[test]
    fn adds_along_the_last_dimension_and_is_keyed_by_its_field() {
        let dev = Cpu::default();
        let mut b = dev.build_module::<Bias<3>, f64>();
        assert_eq!(b.bias.array(), [0.0; 3]);
        assert_eq!(tensor_names(&b), [""]);
        b.bias = dev.tensor([1.0, 2.0, 3.0]);
        let x: Tensor<(usize, usize, Const<3>), f64, _> = dev.zeros_like(&(2, 1, Const));
        assert_eq!(b.forward(x).as_vec(), [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        let report = check_param_grads(&mut b, |m, g| {
            let x: Tensor<Rank3<2, 2, 3>, f64, _> = dev.ones();
            let y = m.forward(x.trace(g));
            (y.with_empty_tape().square() * y).sum::<Rank0, _>()
        });
        assert_eq!(report.checked, 3);
        assert!(report.max_abs_err < 1e-6, "{report}");
    }
}
