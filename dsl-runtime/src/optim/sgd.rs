//! Stochastic gradient descent with momentum, Nesterov momentum and weight decay.

use super::{state, LearningRate, Optim, OptimizerState, ParamUpdate};
use crate::Error;
use dfdx::nn::TensorCollection;
use dfdx::optim::SgdConfig;
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Gradients, Storage, Tensor};
use dfdx::tensor_ops::Device;
use std::fmt;
use std::marker::PhantomData;

/// SGD as PyTorch defines it (dampening 0), on dfdx's fused kernel:
///
/// ```text
/// g ← g + λ·p                      (weight_decay: Some(WeightDecay::L2(λ)))
/// b ← μ·b + g                      (momentum: Some(Momentum::Classic(μ)) or Nesterov(μ); b₀ = 0)
/// g ← g + μ·b  (Nesterov)   or   g ← b  (classic)
/// p ← p − lr·g
/// ```
///
/// State: `momentum_buffer` per parameter (with momentum only). PyTorch:
/// `torch.optim.SGD(params, lr, momentum=μ, nesterov=…, weight_decay=λ)`.
/// `WeightDecay::Decoupled(λ)` instead adds `lr·λ·p` to the step (SGDW), which PyTorch's SGD
/// does not have.
///
/// ```
/// use neural_arch::optim::{Momentum, Optim, Sgd, SgdConfig};
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let mut p: Tensor<Rank1<2>, f64, _> = dev.tensor([1.0, -1.0]);
/// let cfg = SgdConfig { lr: 0.1, momentum: Some(Momentum::Classic(0.9)), weight_decay: None };
/// let mut opt = Sgd::new(&p, cfg);
/// for _ in 0..2 {
///     let mut grads = p.leaky_trace().square().sum().backward(); // g = 2p
///     opt.step(&mut p, &mut grads).unwrap();
/// }
/// // p₁ = 0.8·p₀; b₁ = 2p₀; then b₂ = 0.9·b₁ + 2p₁ = 3.4·p₀ and p₂ = p₁ − 0.34·p₀.
/// assert!((p.array()[0] - 0.46).abs() < 1e-12);
/// ```
#[derive(Clone)]
pub struct Sgd<M, E: Dtype, D: Storage<E>> {
    /// The hyper-parameters; `cfg.lr` is what [`LearningRate::set_lr`] changes.
    pub cfg: SgdConfig,
    /// One buffer per parameter: the momentum, or scratch that dfdx's kernel needs without.
    velocity: Gradients<E, D>,
    steps: u64,
    marker: PhantomData<fn() -> M>,
}

impl<M, E: Dtype, D: Storage<E>> Sgd<M, E, D> {
    /// An optimizer for `model` (used only to fix its type), with no state yet.
    pub fn new(model: &M, cfg: SgdConfig) -> Self {
        let _ = model;
        Self {
            cfg,
            velocity: Gradients::leaky(),
            steps: 0,
            marker: PhantomData,
        }
    }
}

impl<M, E: Dtype, D: Storage<E>> fmt::Debug for Sgd<M, E, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sgd")
            .field("cfg", &self.cfg)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<M, E: Dtype, D: Storage<E>> LearningRate for Sgd<M, E, D> {
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

impl<M, E: Dtype, D: Device<E>> ParamUpdate<E, D> for Sgd<M, E, D> {
    fn update<S: Shape>(
        &mut self,
        param: &mut Tensor<S, E, D>,
        grads: &mut Gradients<E, D>,
    ) -> Result<(), D::Err> {
        let g = grads.get_or_alloc_mut(&*param)?;
        let v = self.velocity.get_or_alloc_mut(&*param)?;
        self.cfg.try_update(param, v, g)
    }
}

impl<M: TensorCollection<E, D>, E: Dtype, D: Device<E>> Sgd<M, E, D> {
    fn buffers(&mut self) -> Vec<(&'static str, &mut Gradients<E, D>)> {
        match self.cfg.momentum {
            Some(_) => vec![("momentum_buffer", &mut self.velocity)],
            None => Vec::new(),
        }
    }
}

impl<M: TensorCollection<E, D>, E: Dtype, D: Device<E>> Optim<M, E, D> for Sgd<M, E, D> {
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
            optimizer: "Sgd".into(),
            step: self.steps,
            buffers: state::export(model, &mut self.buffers())?,
        })
    }

    fn load_state(&mut self, model: &M, state: &OptimizerState<E>) -> Result<(), Error>
    where
        Error: From<D::Err>,
    {
        state::import(model, &mut self.buffers(), "Sgd", state)?;
        self.steps = state.step;
        Ok(())
    }
}

super::dfdx_optimizer!(Sgd);

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_state, run_reference};
    use super::*;
    use dfdx::optim::{Momentum, WeightDecay};

    #[test]
    fn plain_sgd_matches_torch() {
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: None,
            weight_decay: None,
        };
        let (err, mut opt, model) = run_reference("sgd", |m| Sgd::new(m, cfg));
        assert!(err < 1e-12, "max |rust - torch| = {err:e}");
        assert!(opt.state(&model).unwrap().buffers.is_empty());
    }

    #[test]
    fn momentum_and_weight_decay_match_torch() {
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: Some(Momentum::Classic(0.9)),
            weight_decay: Some(WeightDecay::L2(0.01)),
        };
        let (err, mut opt, model) = run_reference("sgd_momentum", |m| Sgd::new(m, cfg));
        assert!(err < 1e-12, "max |rust - torch| = {err:e}");
        assert_state(&opt.state(&model).unwrap(), "sgd_momentum", "Sgd");
    }

    #[test]
    fn nesterov_matches_torch() {
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: Some(Momentum::Nesterov(0.9)),
            weight_decay: Some(WeightDecay::L2(0.01)),
        };
        let (err, mut opt, model) = run_reference("sgd_nesterov", |m| Sgd::new(m, cfg));
        assert!(err < 1e-12, "max |rust - torch| = {err:e}");
        assert_state(&opt.state(&model).unwrap(), "sgd_nesterov", "Sgd");
    }
}
