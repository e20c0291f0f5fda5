//! Dropout with its probability in the type, and masks that a training run can reproduce.
//!
//! dfdx's own dropout draws its masks from the device's generator, whose state a checkpoint
//! cannot save, so a resumed run would drop other units than the uninterrupted one. Here the
//! masks come from a per-thread generator that [`seed_dropout`] re-seeds; the trainer seeds it
//! with the run's seed and the step before every step, which makes each step's masks a pure
//! function of `(seed, step)`.

use super::LayerInfo;
use dfdx::nn::{Module, ModuleMut, ZeroSizedModule};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{Tape, Tensor, TensorFromVec};
use dfdx::tensor_ops::{Device, TryMul};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;

thread_local! {
    static MASKS: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0));
}

/// Re-seeds this thread's dropout masks: the `forward_mut` calls that follow draw the same
/// masks for the same seed. [`Trainer`](crate::train::Trainer) calls it before each step.
pub fn seed_dropout(seed: u64) {
    MASKS.with(|m| *m.borrow_mut() = StdRng::seed_from_u64(seed));
}

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

impl<const P: usize, S: Shape, E: Dtype, D: Device<E> + TensorFromVec<E>, T: Tape<E, D>>
    ModuleMut<Tensor<S, E, D, T>> for Dropout<P>
{
    type Output = Tensor<S, E, D, T>;
    type Error = D::Err;
    fn try_forward_mut(&mut self, x: Tensor<S, E, D, T>) -> Result<Self::Output, D::Err> {
        if P == 0 {
            return Ok(x);
        }
        let p = Self::P;
        let (drop, keep) = (
            E::from_f64(0.0).unwrap_or_default(),
            E::from_f64(1.0 / (1.0 - p)).unwrap_or_default(),
        );
        let shape = *x.shape();
        let mask: Vec<E> = MASKS.with(|m| {
            let mut rng = m.borrow_mut();
            (0..shape.num_elements())
                .map(|_| if rng.gen_bool(p) { drop } else { keep })
                .collect()
        });
        let mask = x.device().try_tensor_from_vec(mask, shape)?;
        x.try_mul(mask)
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

    #[test]
    fn masks_follow_the_seed() {
        let dev = Cpu::default();
        let x: Tensor<Rank1<64>, f32, _> = dev.ones();
        let mut d = Dropout::<50>;
        let mut draw = |seed| {
            super::seed_dropout(seed);
            (
                d.forward_mut(x.clone()).as_vec(),
                d.forward_mut(x.clone()).as_vec(),
            )
        };
        let (a1, a2) = draw(7);
        assert_ne!(a1, a2, "successive calls draw new masks");
        assert_eq!(draw(7), (a1.clone(), a2));
        assert_ne!(draw(8).0, a1);
    }
}
