//! Lion: the sign of an interpolated momentum.

use super::{buffers, state, LearningRate, Optim, OptimizerState, ParamUpdate};
use crate::Error;
use dfdx::nn::TensorCollection;
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Gradients, Storage, Tensor};
use dfdx::tensor_ops::{Device, TryAdd, TryDiv, TryMul};
use std::fmt;
use std::marker::PhantomData;

/// Hyper-parameters of [`Lion`]; the defaults are the paper's (`lr` 1e-4, betas 0.9 / 0.99,
/// no weight decay). The paper suggests a learning rate 3-10× smaller than AdamW's and a weight
/// decay 3-10× larger, so that `lr·λ` stays about the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionConfig {
    /// Learning rate.
    pub lr: f64,
    /// `β₁` (interpolation of the update) and `β₂` (decay of the momentum).
    pub betas: [f64; 2],
    /// Decoupled weight decay `λ`.
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: [0.9, 0.99],
            weight_decay: 0.0,
        }
    }
}

/// Lion, EvoLved Sign Momentum (Chen et al. 2023, <https://arxiv.org/abs/2302.06675>,
/// Algorithm 2):
///
/// ```text
/// u ← sign(β₁·m + (1 − β₁)·g)        (sign(0) = 0)
/// p ← p·(1 − lr·λ) − lr·u
/// m ← β₂·m + (1 − β₂)·g
/// ```
///
/// Every value moves by exactly `lr` (plus the decay): one momentum buffer, `exp_avg`, per
/// parameter, half of Adam's state. A NaN or infinite `β₁·m + (1 − β₁)·g` makes the value NaN,
/// so that a divergence shows in the loss instead of silently freezing the parameter. PyTorch has no Lion; the usual port is `lion-pytorch`'s
/// `Lion(params, lr, betas, weight_decay)`, which computes the same.
///
/// On the CPU the update is one fused loop over the values; elsewhere it is composed of dfdx
/// tensor ops (`axpy`, `abs`, `div`, `nans_to`).
///
/// ```
/// use neural_arch::optim::{Lion, LionConfig, Optim};
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let mut p: Tensor<Rank1<3>, f64, _> = dev.tensor([1.0, -2.0, 0.0]);
/// let mut opt = Lion::new(&p, LionConfig { lr: 0.1, ..Default::default() });
/// let mut grads = p.leaky_trace().square().sum().backward(); // g = 2p
/// opt.step(&mut p, &mut grads).unwrap();
/// assert_eq!(p.array(), [0.9, -1.9, 0.0]);
/// ```
#[derive(Clone)]
pub struct Lion<M, E: Dtype, D: Storage<E>> {
    /// The hyper-parameters; `cfg.lr` is what [`LearningRate::set_lr`] changes.
    pub cfg: LionConfig,
    exp_avg: Gradients<E, D>,
    steps: u64,
    /// Tests set it to run the op-composed update on the CPU too.
    composed_only: bool,
    marker: PhantomData<fn() -> M>,
}

impl<M, E: Dtype, D: Storage<E>> Lion<M, E, D> {
    /// An optimizer for `model` (used only to fix its type), with no state yet.
    pub fn new(model: &M, cfg: LionConfig) -> Self {
        let _ = model;
        Self {
            cfg,
            exp_avg: Gradients::leaky(),
            steps: 0,
            composed_only: false,
            marker: PhantomData,
        }
    }
}

impl<M, E: Dtype, D: Storage<E>> fmt::Debug for Lion<M, E, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lion")
            .field("cfg", &self.cfg)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<M, E: Dtype, D: Storage<E>> LearningRate for Lion<M, E, D> {
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

impl<M, E: Dtype, D: Device<E>> ParamUpdate<E, D> for Lion<M, E, D> {
    fn update<S: Shape>(
        &mut self,
        param: &mut Tensor<S, E, D>,
        grads: &mut Gradients<E, D>,
    ) -> Result<(), D::Err> {
        let LionConfig {
            lr,
            betas: [b1, b2],
            weight_decay,
        } = self.cfg;
        let decay = 1.0 - lr * weight_decay;
        grads.try_alloc_for(&*param)?;
        self.exp_avg.try_alloc_for(&*param)?;
        if !self.composed_only {
            let g = buffers::cpu_slice::<E, D>(grads.get_or_alloc_mut(&*param)?);
            let m = buffers::cpu_slice::<E, D>(self.exp_avg.get_or_alloc_mut(&*param)?);
            if let (Some(g), Some(m)) = (g, m) {
                let cast = |x: f64| E::from_f64(x).unwrap_or_default();
                let (b1, one_b1, b2, one_b2) = (cast(b1), cast(1.0 - b1), cast(b2), cast(1.0 - b2));
                let (decay, lr, zero) = (cast(decay), cast(lr), E::default());
                // Parameters are contiguous: their buffer is their values, as in the gradient.
                let mut values = vec![zero; g.len()];
                param.copy_into(&mut values);
                for ((p, &g), m) in values.iter_mut().zip(g.iter()).zip(m.iter_mut()) {
                    let c = *m * b1 + g * one_b1;
                    // 0·c is 0 for finite c, NaN otherwise.
                    let step = if c * zero != zero {
                        c * zero
                    } else if c > zero {
                        lr
                    } else if c < zero {
                        zero - lr
                    } else {
                        zero
                    };
                    *p = *p * decay - step;
                    *m = *m * b2 + g * one_b2;
                }
                param.copy_from(&values);
                return Ok(());
            }
        }
        let g = grads.get(&*param);
        let mut c = self.exp_avg.get(&*param);
        c.try_axpy(b1, &g, 1.0 - b1)?;
        // sign(c) as c / |c|, exact for every non-zero finite c; 0 / 0 is NaN, set to 0; then
        // + 0·c, which is 0 for finite c and NaN otherwise.
        let nan_if_not_finite = c.clone().try_mul(E::default())?;
        let sign = c
            .clone()
            .try_div(c.try_abs()?)?
            .try_nans_to(0.0)?
            .try_add(nan_if_not_finite)?;
        param.try_axpy(decay, &sign, -lr)?;
        buffers::axpby(self.exp_avg.get_or_alloc_mut(&*param)?, b2, g, 1.0 - b2)
    }
}

impl<M: TensorCollection<E, D>, E: Dtype, D: Device<E>> Optim<M, E, D> for Lion<M, E, D> {
    fn step(&mut self, model: &mut M, grads: &mut Gradients<E, D>) -> Result<(), D::Err> {
        super::update_params(model, grads, self)?;
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn state(&mut self, model: &M) -> Result<OptimizerState<E>, D::Err> {
        Ok(OptimizerState {
            optimizer: "Lion".into(),
            step: self.steps,
            buffers: state::export(model, &mut [("exp_avg", &mut self.exp_avg)])?,
        })
    }

    fn load_state(&mut self, model: &M, state: &OptimizerState<E>) -> Result<(), Error>
    where
        Error: From<D::Err>,
    {
        state::import(model, &mut [("exp_avg", &mut self.exp_avg)], "Lion", state)?;
        self.steps = state.step;
        Ok(())
    }
}

super::dfdx_optimizer!(Lion);

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_state, run_reference};
    use super::*;

    const CFG: LionConfig = LionConfig {
        lr: 0.01,
        betas: [0.9, 0.99],
        weight_decay: 0.1,
    };

    #[test]
    fn fused_cpu_update_matches_the_papers_rule() {
        let (err, mut opt, model) = run_reference("lion", |m| Lion::new(m, CFG));
        assert!(err < 1e-12, "max |rust - numpy| = {err:e}");
        assert_state(&opt.state(&model).unwrap(), "lion", "Lion");
    }

    #[test]
    fn op_composed_update_matches_the_papers_rule() {
        let (err, mut opt, model) = run_reference("lion", |m| {
            let mut opt = Lion::new(m, CFG);
            opt.composed_only = true;
            opt
        });
        assert!(err < 1e-12, "max |rust - numpy| = {err:e}");
        assert_state(&opt.state(&model).unwrap(), "lion", "Lion");
    }

    #[test]
    fn sign_of_zero_is_zero_and_non_finite_momentum_is_nan_in_both_paths() {
        use dfdx::tensor::{AsArray, Cpu, TensorFrom, Trace};
        use dfdx::tensor_ops::{Backward, SumTo};
        for composed_only in [false, true] {
            let dev = Cpu::default();
            let mut p: Tensor<dfdx::shapes::Rank1<3>, f64, Cpu> = dev.tensor([1.0, -2.0, 0.0]);
            let mut opt = Lion::new(
                &p,
                LionConfig {
                    lr: 0.5,
                    ..Default::default()
                },
            );
            opt.composed_only = composed_only;
            let mut grads = p.leaky_trace().square().sum().backward();
            opt.step(&mut p, &mut grads).unwrap();
            assert_eq!(p.array(), [0.5, -1.5, 0.0]);
            // A non-finite gradient shows up as NaN parameters.
            let mut grads = (p.leaky_trace() * f64::INFINITY).sum().backward();
            opt.step(&mut p, &mut grads).unwrap();
            assert!(p.array().iter().all(|v| v.is_nan()), "{:?}", p.array());
        }
    }
}
