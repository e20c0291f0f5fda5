//! Reading the first position of a sequence: the class token that BERT's pooler and a Vision
//! Transformer's classifier read.

use super::LayerInfo;
use crate::Error;
use dfdx::nn::{Module, NonMutableModule, ZeroSizedModule};
use dfdx::shapes::{Const, Dim, Dtype, HasShape};
use dfdx::tensor::{HasErr, Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo};

/// `y[b, :] = x[b, 0, :]`: the first token of each sequence, where BERT and ViT put their
/// `[CLS]` token (BERT's pooler and ViT's classifier read it; Devlin et al.,
/// <https://arxiv.org/abs/1810.04805>, §3; Dosovitskiy et al., <https://arxiv.org/abs/2010.11929>,
/// eq. 4). The gradient flows to position 0 only.
///
/// # Shapes
/// `[B, T, D] -> [B, D]`; an empty sequence (`T = 0`) is an [`Error::Shape`].
///
/// No parameters. PyTorch: `x[:, 0]`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let x = dev.tensor([[[1.0f32, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]);
/// assert_eq!(FirstToken.try_forward(x)?.array(), [[1.0, 2.0], [5.0, 6.0]]);
/// # Ok::<(), ModelError>(())
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FirstToken;

impl ZeroSizedModule for FirstToken {}
impl NonMutableModule for FirstToken {}
impl LayerInfo for FirstToken {
    const PARAMS: usize = 0;
}

impl<const M: usize, B: Dim, S: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, S, Const<M>), E, D, T>> for FirstToken
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, Const<M>), E, D, T>;
    type Error = Error;
    fn try_forward(&self, x: Tensor<(B, S, Const<M>), E, D, T>) -> Result<Self::Output, Error> {
        let (b, s, _) = *x.shape();
        if s.size() == 0 {
            return Err(Error::Shape(
                "FirstToken reads position 0, but the sequence is empty".to_string(),
            ));
        }
        Ok(x.try_slice((.., 0..1, ..))?
            .try_reshape_like(&(b, Const::<M>))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_input_grads;
    use crate::prelude::*;

    #[test]
    fn reads_position_zero_of_runtime_sequences() -> Result<(), Error> {
        let dev = Cpu::default();
        let x: Tensor<(usize, usize, Const<2>), f64, _> =
            dev.tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (1, 3, Const));
        assert_eq!(FirstToken.try_forward(x)?.as_vec(), [1.0, 2.0]);
        let empty: Tensor<(usize, usize, Const<2>), f64, _> = dev.zeros_like(&(2, 0, Const));
        let e = FirstToken.try_forward(empty).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        Ok(())
    }

    #[test]
    fn the_gradient_reaches_position_zero_only() {
        let dev = Cpu::seed_from_u64(3);
        let x: Tensor<Rank3<2, 3, 4>, f64, _> = dev.sample_normal();
        let report = check_input_grads(&x, |x| {
            let y = FirstToken.forward(x);
            (y.with_empty_tape().square() * y).sum::<Rank0, _>()
        });
        assert!(report.max_abs_err < 1e-6, "{report}");
        let g = FirstToken
            .forward(x.leaky_trace())
            .sum::<Rank0, _>()
            .backward();
        let g = g.get(&x).array();
        assert_eq!(g[1][0], [1.0; 4]);
        assert_eq!(g[1][1], [0.0; 4]);
    }
}
