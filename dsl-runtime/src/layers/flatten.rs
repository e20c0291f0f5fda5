//! Flattening all dimensions after the first (the batch).

use super::LayerInfo;
use dfdx::nn::{Module, ZeroSizedModule};
use dfdx::shapes::HasShape;
use dfdx::shapes::{Const, ConstShape, Dim, Dtype};
use dfdx::tensor::{Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo};

/// `[B, d1, d2, ...] -> [B, N]` with `N = d1·d2·…`. PyTorch: `torch.nn.Flatten()`.
///
/// In a `model!` declaration write just `Flatten`: the macro computes `N` from the shape that
/// reaches the layer. Written by hand, a wrong `N` fails to compile ("Flatten<N>: ...").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flatten<const N: usize>;

impl<const N: usize> ZeroSizedModule for Flatten<N> {}
impl<const N: usize> dfdx::nn::NonMutableModule for Flatten<N> {}

impl<const N: usize> LayerInfo for Flatten<N> {
    const PARAMS: usize = 0;
}

struct Product<const N: usize, S>(core::marker::PhantomData<S>);
impl<const N: usize, S: ConstShape> Product<N, S> {
    const OK: () = assert!(
        N == S::NUMEL,
        "Flatten<N>: N must be the product of the flattened sizes"
    );
}

macro_rules! flatten_rank {
    ([$($c:ident),*]) => {
        impl<B: Dim, $(const $c: usize,)* const N: usize, E: Dtype, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<(B, $(Const<$c>,)*), E, D, T>> for Flatten<N>
        {
            type Output = Tensor<(B, Const<N>), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<(B, $(Const<$c>,)*), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                #[allow(clippy::let_unit_value)]
                let () = Product::<N, ($(Const<$c>,)*)>::OK;
                let b = x.shape().0;
                x.try_reshape_like(&(b, Const::<N>))
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
}
