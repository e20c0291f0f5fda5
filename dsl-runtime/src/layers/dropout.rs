//! Dropout with its probability in the type.

use super::LayerInfo;
use dfdx::nn::{Module, ModuleMut, ZeroSizedModule};
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Tape, Tensor};
use dfdx::tensor_ops::Device;

/// Zeroes each element with probability `PERCENT / 100` and scales the rest by `1 / (1 - p)`,
/// in training only: `forward_mut` drops, `forward` is the identity (evaluation mode).
///
/// The probability is a whole percentage because stable Rust has no float const generics:
/// `Dropout<10>` is PyTorch's `torch.nn.Dropout(p=0.1)`. Any shape.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropout<const PERCENT: usize>;

impl<const P: usize> Dropout<P> {
    /// The drop probability, checked at compile time to lie in `[0, 100)` percent.
    pub const P: f64 = {
        assert!(
            P < 100,
            "Dropout<PERCENT> needs PERCENT < 100: it would drop everything"
        );
        P as f64 / 100.0
    };
}

impl<const P: usize> ZeroSizedModule for Dropout<P> {}

impl<const P: usize> LayerInfo for Dropout<P> {
    const PARAMS: usize = 0;
}

impl<const P: usize, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>> Module<Tensor<S, E, D, T>>
    for Dropout<P>
{
    type Output = Tensor<S, E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<S, E, D, T>) -> Result<Self::Output, D::Err> {
        let _ = Self::P;
        Ok(x)
    }
}

impl<const P: usize, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>> ModuleMut<Tensor<S, E, D, T>>
    for Dropout<P>
{
    type Output = Tensor<S, E, D, T>;
    type Error = D::Err;
    fn try_forward_mut(&mut self, x: Tensor<S, E, D, T>) -> Result<Self::Output, D::Err> {
        if P == 0 {
            return Ok(x);
        }
        x.try_dropout(Self::P)
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[test]
    fn dropout_drops_in_training_only() {
        let dev = Cpu::seed_from_u64(0);
        let x: Tensor<Rank1<10000>, f64, _> = dev.ones();
        let mut d = Dropout::<25>;
        assert_eq!(d.forward(x.clone()).array(), x.array());
        let y = d.forward_mut(x).as_vec();
        let zeros = y.iter().filter(|v| **v == 0.0).count();
        assert!(
            (2000..3000).contains(&zeros),
            "{zeros} of 10000 dropped at p = 0.25"
        );
        assert!(y
            .iter()
            .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-12));
    }
}
