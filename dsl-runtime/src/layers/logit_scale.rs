//! A learnable temperature: CLIP's `logit_scale`.

use super::LayerInfo;
use crate::Elem;
use dfdx::nn::{BuildOnDevice, ModuleVisitor, TensorCollection, TensorOptions};
use dfdx::shapes::{Dtype, Rank0};
use dfdx::tensor::{Storage, Tensor};
use dfdx::tensor_ops::Device;

/// One learnable scalar `s`, the log of the factor that multiplies CLIP's cosine similarities
/// ([`clip_loss`](crate::losses::clip_loss) computes `e^s · Î·T̂ᵀ`). It starts at `ln(1/0.07)`
/// (a temperature of 0.07), as in OpenAI's CLIP (<https://arxiv.org/abs/2103.00020>).
///
/// # Shapes
/// No input: the parameter `logit_scale` `[]` (a scalar) is read by the loss.
///
/// PyTorch: `self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))`.
///
/// ```
/// use neural_arch::layers::LogitScale;
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let mut s = dev.build_module::<LogitScale, f32>();
/// assert!((s.logit_scale.array().exp() - 1.0 / 0.07).abs() < 1e-4);
/// s.logit_scale = dev.tensor(7.0);
/// s.clamp(); // at most ln(100), as OpenAI does after each optimizer step
/// assert!((s.logit_scale.array() - 100f32.ln()).abs() < 1e-6);
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogitScale;

/// The built [`LogitScale`].
#[derive(Debug, Clone)]
pub struct LogitScaleModule<E: Dtype, D: Storage<E>> {
    /// `s`, initialised to `ln(1/0.07)`.
    pub logit_scale: Tensor<Rank0, E, D>,
}

/// `ln(1/0.07)`, CLIP's initial `logit_scale`.
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778;

impl LayerInfo for LogitScale {
    const PARAMS: usize = 1;
}

impl<E: Elem, D: Device<E>> BuildOnDevice<D, E> for LogitScale {
    type Built = LogitScaleModule<E, D>;
}

impl<E: Dtype, D: Device<E>> LogitScaleModule<E, D> {
    /// `ln(100)`: OpenAI keeps `e^s ≤ 100` so that training stays stable.
    pub const MAX: f64 = 4.605_170_185_988_092;

    /// Clamps `s` to at most [`MAX`](Self::MAX) (`logit_scale.data.clamp_(0, 4.6052)` in
    /// OpenAI's training loop); call it after each optimizer step. Reads one value back from
    /// the device.
    pub fn clamp(&mut self) {
        let s = self.logit_scale.as_vec()[0];
        let max = E::from_f64(Self::MAX).unwrap_or(s);
        if s > max {
            self.logit_scale.copy_from(&[max]);
        }
    }
}

impl<E: Elem, D: Device<E>> TensorCollection<E, D> for LogitScaleModule<E, D> {
    type To<E2: Dtype, D2: Device<E2>> = LogitScaleModule<E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            // Named "": the key is the field's own name, CLIP's top-level `logit_scale`.
            Self::tensor(
                "",
                |s| &s.logit_scale,
                |s| &mut s.logit_scale,
                TensorOptions::reset_with(|t| {
                    t.copy_from(&[E::from_f64(LOGIT_SCALE_INIT).unwrap_or_default()]);
                    Ok(())
                }),
            ),
            |logit_scale| LogitScaleModule { logit_scale },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    #[test]
    fn starts_at_clips_temperature_and_counts_one_parameter() {
        let dev = Cpu::default();
        let mut s = dev.build_module::<LogitScale, f64>();
        assert_eq!(s.logit_scale.array(), (1.0f64 / 0.07).ln());
        assert_eq!(LogitScale::PARAMS, s.num_trainable_params());
        assert_eq!(LogitScaleModule::<f64, Cpu>::MAX, 100f64.ln());
        s.logit_scale = dev.tensor(1.0);
        s.clamp();
        assert_eq!(s.logit_scale.array(), 1.0);
        s.reset_params();
        assert_eq!(s.logit_scale.array(), LOGIT_SCALE_INIT);
    }
}
