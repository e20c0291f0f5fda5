//! Optimizers, learning-rate schedules, gradient clipping and gradient accumulation, with
//! PyTorch's semantics and state that can be saved for an exact resume.
//!
//! | here | PyTorch |
//! | --- | --- |
//! | [`Sgd`] with [`SgdConfig`] (`momentum: Some(Momentum::Classic(μ))`, `Nesterov(μ)`, `weight_decay: Some(WeightDecay::L2(λ))`) | `torch.optim.SGD(lr, momentum=μ, nesterov=…, weight_decay=λ)`, dampening 0 |
//! | [`Adam`] with [`AdamConfig`] (`weight_decay: Some(WeightDecay::L2(λ))`) | `torch.optim.Adam(lr, betas, eps, weight_decay=λ)` |
//! | [`Adam`] with [`adamw`]`(lr, λ)` (`WeightDecay::Decoupled(λ)`) | `torch.optim.AdamW(lr, weight_decay=λ)` |
//! | [`Lion`] with [`LionConfig`] | the paper's rule (<https://arxiv.org/abs/2302.06675>) |
//! | [`WarmupCosine::lr_at`] | nanoGPT's `get_lr` |
//! | [`clip_grad_norm`] | `torch.nn.utils.clip_grad_norm_` |
//! | [`GradAccumulation`] | summing `loss / k` over `k` micro-batches before `step()` |
//!
//! [`Sgd`] and [`Adam`] run dfdx's fused update kernels (CPU and CUDA), which compute exactly
//! PyTorch's update; what they add to dfdx's optimizers of the same names is the [`Optim`]
//! trait: their state is readable and loadable, their learning rate settable. They still
//! implement dfdx's [`Optimizer`](dfdx::optim::Optimizer), so `opt.update(&mut model, &grads)`
//! works as before, at the cost of one copy of the gradients that [`Optim::step`] avoids.
//!
//! A training step:
//!
//! ```
//! use neural_arch::losses::{cross_entropy, CrossEntropy};
//! use neural_arch::optim::{adamw, clip_grad_norm, Adam, GradAccumulation, Optim, WarmupCosine};
//! use neural_arch::prelude::*;
//!
//! let dev = Cpu::default();
//! let mut model = dev.build_module::<Linear<4, 3>, f32>();
//! let mut opt = Adam::new(&model, adamw(1e-3, 0.1));
//! let schedule = WarmupCosine { peak_lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, decay_steps: 100 };
//! let mut accum = GradAccumulation::new(2).unwrap();
//! let mut grads = model.alloc_grads();
//! for micro_batch in 0..4 {
//!     let x: Tensor<Rank2<8, 4>, f32, _> = dev.sample_normal();
//!     let logits = model.forward(x.trace(grads));
//!     let loss = cross_entropy(logits, &[0, 1, 2, 0, 1, 2, 0, 1], CrossEntropy::default()).unwrap();
//!     grads = accum.scale(loss).unwrap().backward();
//!     if accum.micro_batch_done() {
//!         let norm = clip_grad_norm(&mut grads, &model, 1.0).unwrap();
//!         assert!(norm.is_finite());
//!         let step = opt.steps() as usize;
//!         schedule.apply(&mut opt, step);
//!         opt.step(&mut model, &mut grads).unwrap();
//!         model.zero_grads(&mut grads);
//!     }
//! }
//! assert_eq!(opt.steps(), 2);
//! ```

mod accumulate;
mod adam;
pub(crate) mod buffers;
mod clip;
mod lion;
mod schedule;
mod sgd;
mod state;

pub use accumulate::GradAccumulation;
pub use adam::{adamw, Adam};
pub use clip::clip_grad_norm;
pub use lion::{Lion, LionConfig};
pub use schedule::WarmupCosine;
pub use sgd::Sgd;
pub use state::{OptimizerState, StateBuffer};

pub use dfdx::optim::{AdamConfig, Momentum, SgdConfig, WeightDecay};

use crate::Error;
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut,
};
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Gradients, Storage, Tensor};
use dfdx::tensor_ops::Device;

/// Something with a learning rate that a schedule can set.
pub trait LearningRate {
    /// The learning rate the next step will use.
    fn lr(&self) -> f64;
    /// Sets the learning rate of the next steps.
    fn set_lr(&mut self, lr: f64);
}

/// An optimizer of the parameters of a model `M`: a step from gradients, and a state that can be
/// saved and loaded for an exact resume.
///
/// To resume: save the model (`model.save_safetensors(..)`) and
/// [`opt.state(&model)?.save_safetensors(..)`](OptimizerState::save_safetensors); later build
/// both the same way, `model.load_safetensors(..)`, then
/// [`opt.load_state(&model, &OptimizerState::load_safetensors(..)?)`](Optim::load_state). The
/// next step is then the one the first run would have taken.
pub trait Optim<M, E: Dtype, D: Storage<E>>: LearningRate {
    /// Updates every trainable parameter of `model` from its gradient in `grads` (a parameter
    /// without one counts as a zero gradient, as with `model.alloc_grads()`).
    ///
    /// `grads` is `&mut` only because dfdx lends its gradient buffers that way; the values are
    /// not changed.
    fn step(&mut self, model: &mut M, grads: &mut Gradients<E, D>) -> Result<(), D::Err>;

    /// Steps taken, including those of a loaded state.
    fn steps(&self) -> u64;

    /// A copy of the state, by parameter name (`&mut` because dfdx allocates the buffers of
    /// parameters not stepped yet, as zeros, when reading them).
    fn state(&mut self, model: &M) -> Result<OptimizerState<E>, D::Err>;

    /// Replaces the state with `state`, which must be this optimizer's and have a buffer of the
    /// right shape for every trainable parameter of `model` and no others; on error nothing
    /// changes.
    fn load_state(&mut self, model: &M, state: &OptimizerState<E>) -> Result<(), Error>
    where
        Error: From<D::Err>;
}

/// The update of one parameter tensor, given its gradient.
pub(crate) trait ParamUpdate<E: Dtype, D: Device<E>> {
    fn update<S: Shape>(
        &mut self,
        param: &mut Tensor<S, E, D>,
        grads: &mut Gradients<E, D>,
    ) -> Result<(), D::Err>;
}

/// Runs `update` on every trainable parameter of `model`.
pub(crate) fn update_params<M, E, D, U>(
    model: &mut M,
    grads: &mut Gradients<E, D>,
    update: &mut U,
) -> Result<(), D::Err>
where
    M: TensorCollection<E, D>,
    E: Dtype,
    D: Device<E>,
    U: ParamUpdate<E, D>,
{
    struct Visit<'a, E: Dtype, D: Device<E>, U> {
        grads: &'a mut Gradients<E, D>,
        update: &'a mut U,
    }
    impl<E: Dtype, D: Device<E>, U: ParamUpdate<E, D>> TensorVisitor<E, D> for Visit<'_, E, D, U> {
        type Viewer = ViewTensorMut;
        type Err = D::Err;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, E, D>,
            p: &mut Tensor<S, E, D>,
        ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
            if opts.do_gradient_update {
                self.update.update(p, self.grads)?;
            }
            Ok(None)
        }
    }
    M::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut Visit { grads, update },
    })?;
    Ok(())
}

/// dfdx's [`Optimizer`](dfdx::optim::Optimizer) for an [`Optim`]: `update` copies the gradients
/// (dfdx hands them out read-only) and steps.
macro_rules! dfdx_optimizer {
    ($name:ident) => {
        impl<
                M: dfdx::nn::TensorCollection<E, D>,
                E: dfdx::shapes::Dtype,
                D: dfdx::tensor_ops::Device<E>,
            > dfdx::optim::Optimizer<M, D, E> for $name<M, E, D>
        where
            Self: $crate::optim::Optim<M, E, D>,
        {
            fn update(
                &mut self,
                module: &mut M,
                gradients: &dfdx::tensor::Gradients<E, D>,
            ) -> Result<(), dfdx::optim::OptimizerUpdateError<D::Err>> {
                let mut grads = gradients.clone();
                $crate::optim::Optim::step(self, module, &mut grads)
                    .map_err(dfdx::optim::OptimizerUpdateError::DeviceError)
            }
        }
    };
}
pub(crate) use dfdx_optimizer;

/// The reference run of `tools/reference/losses_optim.py`, shared by the optimizers' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Optim, OptimizerState};
    use crate::prelude::*;
    use serde_json::Value;

    /// `torch.nn.Linear(3, 2)`.
    pub(crate) type Model = crate::Built<Linear<3, 2>, f64, Cpu>;

    pub(crate) fn reference() -> Value {
        serde_json::from_str(include_str!("../../tests/reference/optim.json"))
            .expect("optim.json parses")
    }

    pub(crate) fn floats(v: &Value) -> Vec<f64> {
        let values = v.as_array().expect("an array of numbers");
        values
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect()
    }

    fn case(r: &Value, name: &str) -> Value {
        let cases = r["cases"].as_array().expect("cases");
        cases
            .iter()
            .find(|c| c["name"] == name)
            .expect(name)
            .clone()
    }

    /// The reference model's initial weights.
    pub(crate) fn model(dev: &Cpu) -> Model {
        let r = reference();
        let mut m = dev.build_module::<Linear<3, 2>, f64>();
        m.weight.copy_from(&floats(&r["w0"]));
        m.bias.copy_from(&floats(&r["b0"]));
        m
    }

    /// The gradients of `mean((x Wᵀ + b − y)²)` on the reference batch, added into `grads`.
    pub(crate) fn grads(m: &Model, grads: Gradients<f64, Cpu>) -> Gradients<f64, Cpu> {
        let r = reference();
        let dev = Cpu::default();
        let x = dev.tensor_from_vec(floats(&r["x"]), (Const::<4>, Const::<3>));
        let y = dev.tensor_from_vec(floats(&r["y"]), (Const::<4>, Const::<2>));
        (m.forward(x.trace(grads)) - y)
            .square()
            .mean::<Rank0, _>()
            .backward()
    }

    /// Steps `opt` from the reference model `from.len()` times; the largest difference to
    /// the reference parameters after each step.
    pub(crate) fn run_steps<O: Optim<Model, f64, Cpu>>(
        m: &mut Model,
        opt: &mut O,
        history: &[Value],
    ) -> f64 {
        let mut err = 0f64;
        let mut g = m.alloc_grads();
        for step in history {
            m.zero_grads(&mut g);
            g = grads(m, g);
            opt.step(m, &mut g).unwrap();
            for (got, want) in [
                (m.weight.as_vec(), floats(&step["weight"])),
                (m.bias.as_vec(), floats(&step["bias"])),
            ] {
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    err = err.max((a - b).abs());
                }
            }
        }
        err
    }

    /// Three steps against the reference case `name`: the largest difference, the optimizer
    /// and the model after them.
    pub(crate) fn run_reference<O: Optim<Model, f64, Cpu>>(
        name: &str,
        make: impl FnOnce(&Model) -> O,
    ) -> (f64, O, Model) {
        let case = case(&reference(), name);
        let mut m = model(&Cpu::default());
        let mut opt = make(&m);
        let history = case["history"].as_array().expect("history");
        let err = run_steps(&mut m, &mut opt, history);
        eprintln!(
            "{name}: {} steps, max |rust - reference| = {err:.2e}",
            history.len()
        );
        (err, opt, m)
    }

    /// `state` holds PyTorch's buffers, by PyTorch's names, after the reference run.
    pub(crate) fn assert_state(state: &OptimizerState<f64>, name: &str, optimizer: &str) {
        let case = case(&reference(), name);
        assert_eq!(state.optimizer, optimizer);
        let want = case["state"].as_object().expect("state");
        let mut want_keys: Vec<&String> = want.keys().collect();
        want_keys.sort();
        assert_eq!(state.buffers.keys().collect::<Vec<_>>(), want_keys);
        for (key, values) in want {
            let got = &state.buffers[key];
            for (a, b) in got.values.iter().zip(floats(values)) {
                assert!((a - b).abs() < 1e-12, "{key}: {:?} vs {values}", got.values);
            }
        }
        for (key, b) in &state.buffers {
            let shape: &[usize] = if key.starts_with("weight.") {
                &[2, 3]
            } else {
                &[2]
            };
            assert_eq!(b.shape, shape, "{key}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{model, reference, run_steps, Model};
    use super::*;
    use crate::prelude::Cpu;
    use dfdx::nn::{DeviceBuildExt, LoadFromSafetensors, SaveToSafetensors};

    /// Two steps, save model and optimizer, load both into fresh ones, a third step: the
    /// reference's third step, bit for bit the run's own third step.
    fn resume<O: Optim<Model, f64, Cpu>>(name: &str, make: impl Fn(&Model) -> O) {
        let r = reference();
        let case = r["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        let history = case["history"].as_array().unwrap();
        let dir = std::env::temp_dir().join(format!("na-optim-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let mut m = model(&Cpu::default());
        let mut opt = make(&m);
        run_steps(&mut m, &mut opt, &history[..2]);
        m.save_safetensors(dir.join("model.safetensors")).unwrap();
        let saved = opt.state(&m).unwrap();
        saved
            .save_safetensors(dir.join("optim.safetensors"))
            .unwrap();
        let mut uninterrupted = m.clone();
        run_steps(&mut uninterrupted, &mut opt, &history[2..]);

        let dev = Cpu::seed_from_u64(99);
        let mut m2: Model = dev.build_module::<crate::layers::Linear<3, 2>, f64>();
        m2.load_safetensors(dir.join("model.safetensors")).unwrap();
        let mut opt2 = make(&m2);
        let loaded = OptimizerState::load_safetensors(dir.join("optim.safetensors")).unwrap();
        assert_eq!(loaded, saved);
        opt2.load_state(&m2, &loaded).unwrap();
        assert_eq!(opt2.steps(), 2);
        let err = run_steps(&mut m2, &mut opt2, &history[2..]);
        assert!(err < 1e-12, "{name}: resumed step off by {err:e}");
        assert_eq!(m2.weight.as_vec(), uninterrupted.weight.as_vec());
        assert_eq!(m2.bias.as_vec(), uninterrupted.bias.as_vec());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn resume_from_saved_state_is_exact() {
        resume("sgd_nesterov", |m| {
            Sgd::new(
                m,
                SgdConfig {
                    lr: 0.1,
                    momentum: Some(Momentum::Nesterov(0.9)),
                    weight_decay: Some(WeightDecay::L2(0.01)),
                },
            )
        });
        resume("adamw", |m| {
            Adam::new(
                m,
                AdamConfig {
                    betas: [0.8, 0.99],
                    ..adamw(0.01, 0.1)
                },
            )
        });
        let lion = LionConfig {
            lr: 0.01,
            betas: [0.9, 0.99],
            weight_decay: 0.1,
        };
        resume("lion", |m| Lion::new(m, lion));
    }

    #[test]
    fn mismatched_state_is_rejected_and_leaves_the_optimizer_unchanged() {
        let dev = Cpu::default();
        let mut m = model(&dev);
        let mut opt = Adam::new(&m, AdamConfig::default());
        let mut g = dfdx::nn::ZeroGrads::alloc_grads(&m);
        g = testing::grads(&m, g);
        opt.step(&mut m, &mut g).unwrap();
        let good = opt.state(&m).unwrap();

        let mut wrong_kind = good.clone();
        wrong_kind.optimizer = "Lion".into();
        let err = opt.load_state(&m, &wrong_kind).unwrap_err();
        assert!(err.to_string().contains("Lion's"), "{err}");

        let mut missing = good.clone();
        missing.buffers.remove("bias.exp_avg_sq");
        let err = opt.load_state(&m, &missing).unwrap_err();
        assert!(err.to_string().contains("no `bias.exp_avg_sq`"), "{err}");

        let mut bad_shape = good.clone();
        bad_shape.buffers.get_mut("weight.exp_avg").unwrap().shape = vec![3, 2];
        let err = opt.load_state(&m, &bad_shape).unwrap_err();
        assert!(
            err.to_string()
                .contains("`weight.exp_avg` has shape [3, 2]"),
            "{err}"
        );

        let mut extra = good.clone();
        let b = extra.buffers["bias.exp_avg"].clone();
        extra.buffers.insert("head.bias.exp_avg".into(), b);
        let err = opt.load_state(&m, &extra).unwrap_err();
        assert!(err.to_string().contains("head.bias.exp_avg"), "{err}");

        assert_eq!(opt.state(&m).unwrap(), good);
        assert!(OptimizerState::<f64>::load_safetensors("/nonexistent/optim.safetensors").is_err());
    }

    #[test]
    fn dfdx_optimizer_trait_steps_like_step() {
        let dev = Cpu::default();
        let (mut a, mut b) = (model(&dev), model(&dev));
        let mut opt_a = Adam::new(&a, AdamConfig::default());
        let mut opt_b = Adam::new(&b, AdamConfig::default());
        let ga = testing::grads(&a, dfdx::nn::ZeroGrads::alloc_grads(&a));
        let mut gb = testing::grads(&b, dfdx::nn::ZeroGrads::alloc_grads(&b));
        dfdx::optim::Optimizer::update(&mut opt_a, &mut a, &ga).unwrap();
        opt_b.step(&mut b, &mut gb).unwrap();
        assert_eq!(a.weight.as_vec(), b.weight.as_vec());
        assert_eq!(opt_a.steps(), 1);
    }
}
