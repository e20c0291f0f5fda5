//! Fully connected layers.

use super::LayerInfo;

/// `y = x Wᵀ + b`, applied to the last dimension: `[*, I] -> [*, O]`.
///
/// Parameters: `weight` `[O, I]`, `bias` `[O]`, initialised uniformly in `±1/√I` as in PyTorch.
/// PyTorch: `torch.nn.Linear(I, O)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let fc = dev.build_module::<Linear<3, 2>, f32>();
/// let y = fc.forward(dev.tensor([[1.0f32, 2.0, 3.0]]));
/// assert_eq!(y.shape().1, Const::<2>);
/// ```
pub use dfdx::nn::builders::Linear;

/// `y = x Wᵀ` without a bias: `[*, I] -> [*, O]`; parameter `weight` `[O, I]`.
/// PyTorch: `torch.nn.Linear(I, O, bias=False)`.
pub use dfdx::nn::builders::UnbiasedLinear as LinearNoBias;

impl<const I: usize, const O: usize> LayerInfo for Linear<I, O> {
    const PARAMS: usize = I * O + O;
}

impl<const I: usize, const O: usize> LayerInfo for LinearNoBias<I, O> {
    const PARAMS: usize = I * O;
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[test]
    fn linear_matches_formula() {
        let dev = Cpu::default();
        let mut fc = dev.build_module::<Linear<2, 2>, f64>();
        fc.weight = dev.tensor([[1.0, 2.0], [3.0, 4.0]]);
        fc.bias = dev.tensor([0.5, -0.5]);
        let y = fc.forward(dev.tensor([[1.0, -1.0]]));
        assert_eq!(y.array(), [[1.0 - 2.0 + 0.5, 3.0 - 4.0 - 0.5]]);
        assert_eq!(
            fc.num_trainable_params(),
            <Linear<2, 2> as LayerInfo>::PARAMS
        );
        let nb = dev.build_module::<LinearNoBias<2, 3>, f64>();
        assert_eq!(
            nb.num_trainable_params(),
            <LinearNoBias<2, 3> as LayerInfo>::PARAMS
        );
    }
}
