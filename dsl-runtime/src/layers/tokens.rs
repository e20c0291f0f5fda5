//! Learned tensors that a Vision Transformer adds to its patch tokens: the class token and the
//! position embeddings, stored under the field's own name (`cls_token`, not `cls_token.weight`),
//! as Hugging Face's ViT and CLIP store them.

#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use super::embedding::fill_normal;
use super::LayerInfo;
use crate::{Elem, Error};
use dfdx::nn::{
    BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection, TensorOptions,
};
use dfdx::shapes::{Axis, Const, Dim, Dtype, HasShape, Rank1, Rank3};
use dfdx::tensor::{HasErr, Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, Device, ReshapeTo, TryAdd, TryConcatAlong};

/// Prepends one learned `[CLS]` token to a sequence: `[B, N, D] -> [B, N+1, D]`; the classifier
/// later reads position 0 (Dosovitskiy et al., <https://arxiv.org/abs/2010.11929>, eq. 1).
///
/// # Shapes
/// `[B, N, D] -> [B, N+1, D]`; the output length is a runtime `usize`.
///
/// Parameter: the tensor itself, `[1, 1, D]`, keyed by the field name (Hugging Face ViT's
/// `vit.embeddings.cls_token`), initialised from N(0, 0.02²).
///
/// PyTorch: `torch.cat([cls_token.expand(B, -1, -1), x], dim=1)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let cls = dev.build_module::<ClsToken<4>, f32>();
/// let x: Tensor<Rank3<2, 9, 4>, f32, _> = dev.zeros();
/// assert_eq!(cls.try_forward(x)?.shape(), &(Const::<2>, 10, Const::<4>));
/// # Ok::<(), ModelError>(())
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClsToken<const D: usize>;

/// The built [`ClsToken`].
#[derive(Debug, Clone)]
pub struct ClsTokenModule<const M: usize, E: Dtype, D: Storage<E>> {
    /// The token, `[1, 1, D]`.
    pub token: Tensor<Rank3<1, 1, M>, E, D>,
}

/// [`ClsToken`] stored as a vector `[D]`: CLIP's `vision_model.embeddings.class_embedding`.
///
/// # Shapes
/// `[B, N, D] -> [B, N+1, D]`, as [`ClsToken`].
///
/// PyTorch: `torch.cat([class_embedding.expand(B, 1, -1), x], dim=1)`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClassEmbedding<const D: usize>;

/// The built [`ClassEmbedding`].
#[derive(Debug, Clone)]
pub struct ClassEmbeddingModule<const M: usize, E: Dtype, D: Storage<E>> {
    /// The token, `[D]`.
    pub token: Tensor<Rank1<M>, E, D>,
}

/// Adds learned positions `[1, N, D]` to a sequence of exactly `N` tokens (ViT's
/// `position_embeddings`, one row for the class token and one per patch).
///
/// # Shapes
/// `[B, T, D] -> [B, T, D]` with `T = N`, checked at run time ([`Error::Shape`]).
///
/// Parameter: the tensor itself, `[1, N, D]`, keyed by the field name (Hugging Face ViT's
/// `vit.embeddings.position_embeddings`), initialised from N(0, 0.02²).
///
/// PyTorch: `x + position_embeddings`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LearnedPositions<const N: usize, const D: usize>;

/// The built [`LearnedPositions`].
#[derive(Debug, Clone)]
pub struct LearnedPositionsModule<const N: usize, const M: usize, E: Dtype, D: Storage<E>> {
    /// The positions, `[1, N, D]`.
    pub positions: Tensor<Rank3<1, N, M>, E, D>,
}

impl<const M: usize> LayerInfo for ClsToken<M> {
    const PARAMS: usize = M;
}
impl<const M: usize> LayerInfo for ClassEmbedding<M> {
    const PARAMS: usize = M;
}
impl<const N: usize, const M: usize> LayerInfo for LearnedPositions<N, M> {
    const PARAMS: usize = N * M;
}

impl<const M: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E> for ClsToken<M> {
    type Built = ClsTokenModule<M, E, D>;
}
impl<const M: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E> for ClassEmbedding<M> {
    type Built = ClassEmbeddingModule<M, E, D>;
}
impl<const N: usize, const M: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E>
    for LearnedPositions<N, M>
{
    type Built = LearnedPositionsModule<N, M, E, D>;
}

impl<const M: usize, E: Dtype, D: Storage<E>> NonMutableModule for ClsTokenModule<M, E, D> {}
impl<const M: usize, E: Dtype, D: Storage<E>> NonMutableModule for ClassEmbeddingModule<M, E, D> {}
impl<const N: usize, const M: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for LearnedPositionsModule<N, M, E, D>
{
}

// The tensors are named "": the checkpoint key is the field's own name, as upstream stores it.
impl<const M: usize, E: Elem, D: Device<E>> TensorCollection<E, D> for ClsTokenModule<M, E, D> {
    type To<E2: Dtype, D2: Device<E2>> = ClsTokenModule<M, E2, D2>;
    fn iter_tensors<W: ModuleVisitor<Self, E, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            Self::tensor(
                "",
                |s| &s.token,
                |s| &mut s.token,
                TensorOptions::reset_with(|t| fill_normal(t, 0.02)),
            ),
            |token| ClsTokenModule { token },
        )
    }
}

impl<const M: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for ClassEmbeddingModule<M, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = ClassEmbeddingModule<M, E2, D2>;
    fn iter_tensors<W: ModuleVisitor<Self, E, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            Self::tensor(
                "",
                |s| &s.token,
                |s| &mut s.token,
                TensorOptions::reset_with(|t| fill_normal(t, 0.02)),
            ),
            |token| ClassEmbeddingModule { token },
        )
    }
}

impl<const N: usize, const M: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for LearnedPositionsModule<N, M, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = LearnedPositionsModule<N, M, E2, D2>;
    fn iter_tensors<W: ModuleVisitor<Self, E, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            Self::tensor(
                "",
                |s| &s.positions,
                |s| &mut s.positions,
                TensorOptions::reset_with(|t| fill_normal(t, 0.02)),
            ),
            |positions| LearnedPositionsModule { positions },
        )
    }
}

/// `[token; x]` along the sequence, the token (`[1, 1, M]` on tape `T`) broadcast over the batch.
fn prepend<const M: usize, B: Dim, N: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    token: Tensor<Rank3<1, 1, M>, E, D, T>,
    x: Tensor<(B, N, Const<M>), E, D, T>,
) -> Result<Tensor<(B, usize, Const<M>), E, D, T>, D::Err> {
    let (b, n, _) = *x.shape();
    let tok = token
        .try_reshape_like(&(Const::<M>,))?
        .try_broadcast_like(&(b, 1usize, Const::<M>))?;
    let x = x.try_reshape_like(&(b, n.size(), Const::<M>))?;
    (tok, x).try_concat_along(Axis::<1>)
}

impl<const M: usize, B: Dim, N: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, N, Const<M>), E, D, T>> for ClsTokenModule<M, E, D>
{
    type Output = Tensor<(B, usize, Const<M>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, N, Const<M>), E, D, T>) -> Result<Self::Output, D::Err> {
        prepend(self.token.retaped::<T>(), x)
    }
}

impl<const M: usize, B: Dim, N: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, N, Const<M>), E, D, T>> for ClassEmbeddingModule<M, E, D>
{
    type Output = Tensor<(B, usize, Const<M>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, N, Const<M>), E, D, T>) -> Result<Self::Output, D::Err> {
        let token = self.token.retaped::<T>().try_reshape::<Rank3<1, 1, M>>()?;
        prepend(token, x)
    }
}

impl<const N: usize, const M: usize, B: Dim, S: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, S, Const<M>), E, D, T>> for LearnedPositionsModule<N, M, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, S, Const<M>), E, D, T>;
    type Error = Error;
    fn try_forward(&self, x: Tensor<(B, S, Const<M>), E, D, T>) -> Result<Self::Output, Error> {
        let shape = *x.shape();
        if shape.1.size() != N {
            return Err(Error::Shape(format!(
                "LearnedPositions<{N}, {M}> adds {N} positions, but the sequence has {} tokens \
                 (for a ViT: 1 class token + the number of patches)",
                shape.1.size()
            )));
        }
        let pos = self
            .positions
            .retaped::<T>()
            .try_reshape_like(&(shape.1, Const::<M>))?
            .try_broadcast_like(&shape)?;
        Ok(x.try_add(pos)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_param_grads;
    use crate::prelude::*;

    #[test]
    fn the_token_comes_first_and_positions_add() -> Result<(), Error> {
        let dev = Cpu::default();
        let mut cls = dev.build_module::<ClsToken<2>, f64>();
        cls.token = dev.tensor([[[7.0, 8.0]]]);
        let x: Tensor<Rank3<1, 2, 2>, f64, _> = dev.tensor([[[1.0, 2.0], [3.0, 4.0]]]);
        let y = cls.try_forward(x)?;
        assert_eq!(y.as_vec(), [7.0, 8.0, 1.0, 2.0, 3.0, 4.0]);
        let mut pos = dev.build_module::<LearnedPositions<3, 2>, f64>();
        pos.positions = dev.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]]);
        assert_eq!(
            pos.try_forward(y.clone())?.as_vec(),
            [8.0, 9.0, 3.0, 4.0, 6.0, 7.0]
        );
        let short = y.try_slice((.., 0..2, ..))?;
        assert!(pos.try_forward(short).is_err());
        Ok(())
    }

    #[test]
    fn keys_are_the_field_names() {
        use crate::checkpoint::tensor_names;
        let dev = Cpu::default();
        let cls = dev.build_module::<ClassEmbedding<3>, f32>();
        assert_eq!(tensor_names(&cls), [""]);
    }

    #[test]
    fn gradients_reach_the_tokens() {
        let dev = Cpu::default();
        let mut cls = dev.build_module::<ClsToken<3>, f64>();
        let x: Tensor<Rank3<2, 2, 3>, f64, _> = dev.sample_normal();
        let report = check_param_grads(&mut cls, |m, g| {
            let y = m.forward(x.trace(g));
            (y.with_empty_tape().square() * y).sum::<Rank0, _>()
        });
        assert_eq!(report.checked, 3);
        assert!(report.max_abs_err < 1e-6, "{report}");
        let mut pos = dev.build_module::<LearnedPositions<3, 3>, f64>();
        let y: Tensor<Rank3<2, 3, 3>, f64, _> = dev.sample_normal();
        let report = check_param_grads(&mut pos, |m, g| {
            let y = m.forward(y.trace(g));
            (y.with_empty_tape().square() * y).sum::<Rank0, _>()
        });
        assert_eq!(report.checked, 9);
        assert!(report.max_abs_err < 1e-6, "{report}");
    }
}
