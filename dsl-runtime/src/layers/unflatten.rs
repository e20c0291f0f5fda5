//! Splitting the last dimension: the inverse of [`Flatten`](super::Flatten).

use super::LayerInfo;
use crate::Error;
use dfdx::nn::{Module, NonMutableModule, ZeroSizedModule};
use dfdx::shapes::{Const, Dim, Dtype, HasShape};
use dfdx::tensor::{HasErr, Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo};

/// `[*, A·C] -> [*, A, C]`: the last dimension split in two, row-major (the first `C` values
/// become row 0). PyTorch: `torch.nn.Unflatten(-1, (A, C))`.
///
/// In `model!` the macro checks that the incoming size is `A·C` when it knows it; at run time a
/// last dimension of another size is an [`Error::Shape`].
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let y = Unflatten2::<2, 3>.forward(dev.tensor([[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]]));
/// assert_eq!(y.array(), [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]);
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unflatten2<const A: usize, const C: usize>;

impl<const A: usize, const C: usize> ZeroSizedModule for Unflatten2<A, C> {}
impl<const A: usize, const C: usize> NonMutableModule for Unflatten2<A, C> {}

impl<const A: usize, const C: usize> LayerInfo for Unflatten2<A, C> {
    const PARAMS: usize = 0;
}

fn check<const A: usize, const C: usize>(got: usize) -> Result<(), Error> {
    if got == A * C {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "Unflatten2<{A}, {C}> splits a last dimension of {} into {A}×{C}, but was given {got}",
            A * C
        )))
    }
}

macro_rules! unflatten_rank {
    ([$($d:ident),*], $last:tt) => {
        impl<const A: usize, const C: usize, $($d: Dim,)* X: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)* X,), E, D, T>> for Unflatten2<A, C>
        where
            Error: From<<D as HasErr>::Err>,
        {
            type Output = Tensor<($($d,)* Const<A>, Const<C>), E, D, T>;
            type Error = Error;
            #[allow(non_snake_case)]
            fn try_forward(&self, x: Tensor<($($d,)* X,), E, D, T>) -> Result<Self::Output, Error> {
                let shape = *x.shape();
                check::<A, C>(shape.$last.size())?;
                let ($($d,)* _,) = shape;
                Ok(x.try_reshape_like(&($($d,)* Const::<A>, Const::<C>))?)
            }
        }
    };
}
unflatten_rank!([], 0);
unflatten_rank!([B], 1);
unflatten_rank!([B, S], 2);

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_input_grads;
    use crate::prelude::*;

    #[test]
    fn splits_row_major_and_checks_the_size() {
        let dev = Cpu::default();
        let x: Tensor<(usize, usize, usize), f64, Cpu> = dev.sample_normal_like(&(2, 3, 6));
        let v = x.as_vec();
        let x = x.realize::<(usize, usize, usize)>();
        let y = Unflatten2::<2, 3>
            .try_forward(x.clone())
            .map(|y| y.as_vec());
        assert_eq!(y, Ok(v));
        let bad: Tensor<(usize, usize), f64, Cpu> = dev.zeros_like(&(2, 5));
        let err = Unflatten2::<2, 3>.try_forward(bad).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("was given 5"), "{err}");
        let x: Tensor<Rank2<2, 6>, f64, Cpu> = dev.sample_normal();
        let r = check_input_grads(&x, |x| {
            Unflatten2::<3, 2>.forward(x).square().sum::<Rank0, _>()
        });
        assert!(r.max_abs_err < 1e-6, "{r}");
    }
}
