//! Adam and AdamW.

use super::{state, LearningRate, Optim, OptimizerState, ParamUpdate};
use crate::Error;
use dfdx::nn::TensorCollection;
use dfdx::optim::{AdamConfig, WeightDecay};
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Gradients, Storage, Tensor};
use dfdx::tensor_ops::Device;
use std::fmt;
use std::marker::PhantomData;

/// Adam (<https://arxiv.org/abs/1412.6980>) and, with decoupled weight decay, AdamW
/// (<https://arxiv.org/abs/1711.05101>), as PyTorch computes them, on dfdx's fused kernel. At
/// step `t` (from 1):
///
/// ```text
/// g ← g + λ·p                                   (weight_decay: Some(WeightDecay::L2(λ)): Adam)
/// m ← β₁·m + (1 − β₁)·g,   v ← β₂·v + (1 − β₂)·g²
/// p ← p − lr·λ·p − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
///                                               (the lr·λ·p term: WeightDecay::Decoupled(λ): AdamW)
/// ```
///
/// State: `exp_avg` (m) and `exp_avg_sq` (v) per parameter, and the step count `t`. PyTorch:
/// `torch.optim.Adam(params, lr, betas, eps, weight_decay=λ)`, and with [`adamw`],
/// `torch.optim.AdamW(params, lr, betas, eps, weight_decay=λ)` (no AMSGrad in either).
///
/// ```
/// use neural_arch::optim::{adamw, Adam, Optim};
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let mut p: Tensor<Rank1<2>, f64, _> = dev.tensor([1.0, -1.0]);
/// let mut opt = Adam::new(&p, adamw(0.1, 0.0));
/// let mut grads = p.leaky_trace().square().sum().backward();
/// opt.step(&mut p, &mut grads).unwrap();
/// // The first Adam step moves each value by lr·sign(g) (up to ε).
/// assert!((p.array()[0] - 0.9).abs() < 1e-7);
/// ```
#[derive(Clone)]
pub struct Adam<M, E: Dtype, D: Storage<E>> {
    /// The hyper-parameters; `cfg.lr` is what [`LearningRate::set_lr`] changes.
    pub cfg: AdamConfig,
    exp_avg: Gradients<E, D>,
    exp_avg_sq: Gradients<E, D>,
    steps: u64,
    marker: PhantomData<fn() -> M>,
}

/// PyTorch's `torch.optim.AdamW(lr=lr, weight_decay=weight_decay)`: betas `(0.9, 0.999)`,
/// eps `1e-8`, decoupled weight decay (PyTorch's default `weight_decay` is `0.01`).
pub fn adamw(lr: f64, weight_decay: f64) -> AdamConfig {
    AdamConfig {
        lr,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: Some(WeightDecay::Decoupled(weight_decay)),
    }
}

impl<M, E: Dtype, D: Storage<E>> Adam<M, E, D> {
    /// An optimizer for `model` (used only to fix its type), with no state yet.
    pub fn new(model: &M, cfg: AdamConfig) -> Self {
        let _ = model;
        Self {
            cfg,
            exp_avg: Gradients::leaky(),
            exp_avg_sq: Gradients::leaky(),
            steps: 0,
            marker: PhantomData,
        }
    }
}

impl<M, E: Dtype, D: Storage<E>> fmt::Debug for Adam<M, E, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adam")
            .field("cfg", &self.cfg)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<M, E: Dtype, D: Storage<E>> LearningRate for Adam<M, E, D> {
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

impl<M, E: Dtype, D: Device<E>> ParamUpdate<E, D> for Adam<M, E, D> {
    fn update<S: Shape>(
        &mut self,
        param: &mut Tensor<S, E, D>,
        grads: &mut Gradients<E, D>,
    ) -> Result<(), D::Err> {
        // Past 2³¹ steps both bias corrections are 1 to any precision.
        let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
        let g = grads.get_or_alloc_mut(&*param)?;
        let m = self.exp_avg.get_or_alloc_mut(&*param)?;
        let v = self.exp_avg_sq.get_or_alloc_mut(&*param)?;
        self.cfg.try_update(t, param, m, v, g)
    }
}

impl<M: TensorCollection<E, D>, E: Dtype, D: Device<E>> Optim<M, E, D> for Adam<M, E, D> {
    fn step(&mut self, model: &mut M, grads: &mut Gradients<E, D>) -> Result<(), D::Err> {
        self.steps += 1;
        super::update_params(model, grads, self)
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn state(&mut self, model: &M) -> Result<OptimizerState<E>, D::Err> {
        let buffers = state::export(
            model,
            &mut [
                ("exp_avg", &mut self.exp_avg),
                ("exp_avg_sq", &mut self.exp_avg_sq),
            ],
        )?;
        Ok(OptimizerState {
            optimizer: "Adam".into(),
            step: self.steps,
            buffers,
        })
    }

    fn load_state(&mut self, model: &M, state: &OptimizerState<E>) -> Result<(), Error>
    where
        Error: From<D::Err>,
    {
        state::import(
            model,
            &mut [
                ("exp_avg", &mut self.exp_avg),
                ("exp_avg_sq", &mut self.exp_avg_sq),
            ],
            "Adam",
            state,
        )?;
        self.steps = state.step;
        Ok(())
    }
}

super::dfdx_optimizer!(Adam);

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_state, run_reference};
    use super::*;

    #[test]
    fn adam_with_l2_weight_decay_matches_torch() {
        let cfg = AdamConfig {
            lr: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: Some(WeightDecay::L2(0.01)),
        };
        let (err, mut opt, model) = run_reference("adam", |m| Adam::new(m, cfg));
        assert!(err < 1e-12, "max |rust - torch| = {err:e}");
        assert_state(&opt.state(&model).unwrap(), "adam", "Adam");
        assert_eq!(opt.state(&model).unwrap().step, 3);
    }

    #[test]
    fn adamw_matches_torch() {
        let cfg = AdamConfig {
            betas: [0.8, 0.99],
            ..adamw(0.01, 0.1)
        };
        let (err, mut opt, model) = run_reference("adamw", |m| Adam::new(m, cfg));
        assert!(err < 1e-12, "max |rust - torch| = {err:e}");
        assert_state(&opt.state(&model).unwrap(), "adamw", "Adam");
    }
}
