//! Flattening all dimensions after the first (the batch).

use super::LayerInfo;
use crate::Error;
use dfdx::nn::{Module, NonMutableModule, ZeroSizedModule};
use dfdx::shapes::{Const, Dim, Dtype, HasShape, Shape};
use dfdx::tensor::{HasErr, Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo};

/// `[B, d1, d2, ...] -> [B, N]` with `N = d1·d2·…`. PyTorch: `torch.nn.Flatten()`.
///
/// In a `model!` declaration write just `Flatten`: the macro computes `N` from the shape that
/// reaches the layer and rejects a wrong `Flatten<N>`. The sizes after the batch may be runtime
/// values (a convolution's output, say); their product is checked against `N` when the layer
/// runs, and a mismatch is an [`Error::Shape`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flatten<const N: usize>;

impl<const N: usize> ZeroSizedModule for Flatten<N> {}
impl<const N: usize> NonMutableModule for Flatten<N> {}

impl<const N: usize> LayerInfo for Flatten<N> {
    const PARAMS: usize = 0;
}

macro_rules! flatten_rank {
    ([$($d:ident),*]) => {
        impl<B: Dim, $($d: Dim,)* const N: usize, E: Dtype, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<(B, $($d,)*), E, D, T>> for Flatten<N>
        where
            Error: From<<D as HasErr>::Err>,
        {
            type Output = Tensor<(B, Const<N>), E, D, T>;
            type Error = Error;
            fn try_forward(
                &self,
                x: Tensor<(B, $($d,)*), E, D, T>,
            ) -> Result<Self::Output, Error> {
                let shape = *x.shape();
                let b = shape.0;
                let features = shape.num_elements() / b.size().max(1);
                if features != N && b.size() > 0 {
                    return Err(Error::Shape(format!(
                        "Flatten<{N}> was given {:?}, which has {features} values per example",
                        shape.concrete()
                    )));
                }
                Ok(x.try_reshape_like(&(b, Const::<N>))?)
            }
        }
    };
}
flatten_rank!([C1, C2]);
flatten_rank!([C1, C2, C3]);
flatten_rank!([C1, C2, C3, C4]);

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[test]
    fn flattens_row_major() {
        let dev = Cpu::default();
        let x = dev.tensor([[[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0]]]);
        let y = Flatten::<6>.forward(x);
        assert_eq!(y.array(), [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]);
    }

    #[test]
    fn runtime_sizes_are_checked() {
        let dev = Cpu::default();
        let x: Tensor<(Const<2>, usize, usize), f64, _> = dev.zeros_like(&(Const, 3, 4));
        assert_eq!(
            Flatten::<12>.try_forward(x.clone()).map(|y| y.shape().1),
            Ok(Const::<12>)
        );
        let err = Flatten::<10>.try_forward(x).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("12 values per example"), "{err}");
    }
}
