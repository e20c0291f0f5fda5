//! Gradient accumulation: one optimizer step from several micro-batches.

use crate::Error;
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Tape, Tensor};
use dfdx::tensor_ops::{Device, TryMul};

/// Counts micro-batches and scales their losses, so that `k` backward passes into the same
/// gradients add up to the gradient of one batch `k` times as large.
///
/// dfdx already sums: tracing the next micro-batch with the gradients of the previous
/// (`x.trace(grads)`) makes its backward pass add into them. What is left is the scale: each
/// micro-batch loss is multiplied by `1/k` ([`scale`](Self::scale)), so the sum is the gradient
/// of the *mean* of the `k` losses, which for equal micro-batches and a mean-reduced loss is the
/// gradient of the loss of the whole batch, and the learning rate means the same as without
/// accumulation. (With `ignore_index`, micro-batches with different numbers of counted targets
/// are weighted equally, not by their counts, exactly as PyTorch's usual `loss / k` loop does.)
///
/// ```
/// use neural_arch::optim::GradAccumulation;
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let model = dev.build_module::<Linear<2, 1>, f64>();
/// let mut accum = GradAccumulation::new(2).unwrap();
/// let mut grads = model.alloc_grads();
/// let mut steps = 0;
/// for _ in 0..6 {
///     let x: Tensor<Rank2<4, 2>, f64, _> = dev.sample_normal();
///     let loss = model.forward(x.trace(grads)).square().mean();
///     grads = accum.scale(loss).unwrap().backward();
///     if accum.micro_batch_done() {
///         steps += 1; // clip, opt.step(&mut model, &mut grads), model.zero_grads(&mut grads)
///         model.zero_grads(&mut grads);
///     }
/// }
/// assert_eq!(steps, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradAccumulation {
    micro_batches: usize,
    done: usize,
}

impl GradAccumulation {
    /// Steps every `micro_batches` micro-batches (at least 1, else [`Error::Config`]).
    pub fn new(micro_batches: usize) -> Result<Self, Error> {
        if micro_batches == 0 {
            return Err(Error::Config(
                "GradAccumulation: micro_batches must be at least 1 (1 = no accumulation)".into(),
            ));
        }
        Ok(Self {
            micro_batches,
            done: 0,
        })
    }

    /// Micro-batches per optimizer step.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// `loss / k`: call it on every micro-batch loss before `backward()`.
    pub fn scale<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
        &self,
        loss: Tensor<S, E, D, T>,
    ) -> Result<Tensor<S, E, D, T>, D::Err> {
        if self.micro_batches == 1 {
            return Ok(loss);
        }
        loss.try_mul(E::from_f64(1.0 / self.micro_batches as f64).unwrap_or(E::ONE))
    }

    /// Counts one micro-batch; `true` when it completes a group of `k`: time to step and zero
    /// the gradients.
    pub fn micro_batch_done(&mut self) -> bool {
        self.done += 1;
        if self.done == self.micro_batches {
            self.done = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    #[test]
    fn two_micro_batches_equal_one_batch_of_twice_the_size() {
        let dev = Cpu::seed_from_u64(11);
        let model = dev.build_module::<Linear<3, 2>, f64>();
        let x: Tensor<Rank2<8, 3>, f64, _> = dev.sample_normal();
        let y: Tensor<Rank2<8, 2>, f64, _> = dev.sample_normal();
        let loss = |x: Tensor<(usize, Const<3>), f64, Cpu, OwnedTape<f64, Cpu>>,
                    y: Tensor<(usize, Const<2>), f64, Cpu>| {
            (model.forward(x) - y).square().mean::<Rank0, _>()
        };
        let full = loss(
            x.clone()
                .reshape_like(&(8, Const))
                .trace(model.alloc_grads()),
            y.clone().reshape_like(&(8, Const)),
        )
        .backward();

        let mut accum = GradAccumulation::new(2).unwrap();
        let (xs, ys) = (x.as_vec(), y.as_vec());
        let mut grads = model.alloc_grads();
        let mut stepped = Vec::new();
        for half in 0..2 {
            let xh = dev.tensor_from_vec(xs[half * 12..][..12].to_vec(), (4, Const::<3>));
            let yh = dev.tensor_from_vec(ys[half * 8..][..8].to_vec(), (4, Const::<2>));
            grads = accum.scale(loss(xh.trace(grads), yh)).unwrap().backward();
            stepped.push(accum.micro_batch_done());
        }
        assert_eq!(stepped, [false, true]);
        for (a, b) in [
            (
                grads.get(&model.weight).as_vec(),
                full.get(&model.weight).as_vec(),
            ),
            (
                grads.get(&model.bias).as_vec(),
                full.get(&model.bias).as_vec(),
            ),
        ] {
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-14, "{a:?} vs {b:?}");
            }
        }
        assert!(GradAccumulation::new(0).is_err());
    }
}
