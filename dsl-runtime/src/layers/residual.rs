//! Residual connections as a layer: `F(x) + x`.

use super::LayerInfo;
use crate::summary::SummaryRow;
use crate::Error;
use dfdx::nn::{BuildModule, BuildOnDevice, Module, ModuleMut, ModuleVisitor, TensorCollection};
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{HasErr, Merge, Tape, Tensor, WithEmptyTape};
use dfdx::tensor_ops::Device;
use std::marker::PhantomData;

/// `F(x) + x`, as introduced by ResNet (<https://arxiv.org/abs/1512.03385>): `F` must keep the
/// shape. The parameters of `F` are keyed `0.*` (`res.0.fc.weight`).
///
/// In a `forward` body the same is written `x + f(x)`; the wrapper is for chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residual<F>(PhantomData<F>);

impl<F> Default for Residual<F> {
    fn default() -> Self {
        Residual(PhantomData)
    }
}

/// The built [`Residual`].
#[derive(Debug, Clone)]
pub struct ResidualModule<M>(pub M);

impl<F: LayerInfo> LayerInfo for Residual<F> {
    const PARAMS: usize = F::PARAMS;
    const CHECKS: () = F::CHECKS;
    fn children(prefix: &str, depth: usize) -> Vec<SummaryRow> {
        F::children(&format!("{prefix}.0"), depth)
    }
}

impl<E: Dtype, D: Device<E>, F: BuildOnDevice<D, E>> BuildOnDevice<D, E> for Residual<F>
where
    ResidualModule<F::Built>: BuildModule<D, E>,
{
    type Built = ResidualModule<F::Built>;
}

impl<E: Dtype, D: Device<E>, M: TensorCollection<E, D>> TensorCollection<E, D>
    for ResidualModule<M>
{
    type To<E2: Dtype, D2: Device<E2>> = ResidualModule<M::To<E2, D2>>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(Self::module("0", |s| &s.0, |s| &mut s.0), ResidualModule)
    }
}

impl<M, S: Shape, E: Dtype, D: Device<E>, T> Module<Tensor<S, E, D, T>> for ResidualModule<M>
where
    M: Module<Tensor<S, E, D, T>, Output = Tensor<S, E, D, T>>,
    M::Error: Into<Error>,
    T: Tape<E, D> + Merge<T>,
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<S, E, D, T>;
    type Error = Error;

    fn try_forward(&self, x: Tensor<S, E, D, T>) -> Result<Self::Output, Error> {
        let fx = self
            .0
            .try_forward(x.with_empty_tape())
            .map_err(Into::into)?;
        Ok(super::elementwise::add(fx, x)?)
    }
}

impl<M, S: Shape, E: Dtype, D: Device<E>, T> ModuleMut<Tensor<S, E, D, T>> for ResidualModule<M>
where
    M: ModuleMut<Tensor<S, E, D, T>, Output = Tensor<S, E, D, T>>,
    M::Error: Into<Error>,
    T: Tape<E, D> + Merge<T>,
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<S, E, D, T>;
    type Error = Error;

    fn try_forward_mut(&mut self, x: Tensor<S, E, D, T>) -> Result<Self::Output, Error> {
        let fx = self
            .0
            .try_forward_mut(x.with_empty_tape())
            .map_err(Into::into)?;
        Ok(super::elementwise::add(fx, x)?)
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_input_grads;
    use crate::prelude::*;

    #[test]
    fn adds_the_input_and_backpropagates_through_both_paths() {
        let dev = Cpu::seed_from_u64(3);
        let r = dev.build_module::<Residual<Linear<3, 3>>, f64>();
        let x: Tensor<Rank2<2, 3>, f64, Cpu> = dev.sample_normal();
        let want: Vec<f64> =
            r.0.forward(x.clone())
                .as_vec()
                .iter()
                .zip(x.as_vec())
                .map(|(a, b)| a + b)
                .collect();
        assert_eq!(r.forward(x.clone()).as_vec(), want);
        let report = check_input_grads(&x, |x| r.forward(x).square().sum::<Rank0, _>());
        assert!(report.max_abs_err < 1e-6, "{report}");
    }
}
