//! Mixed precision training: `f32` master weights, forward and backward passes in `f16`, and
//! dynamic loss scaling, as `torch.amp` with `GradScaler` does.
//!
//! Each step ([`mixed_step`]):
//!
//! 1. the master weights (the model the optimizer updates, in `f32`) are cast to a fresh `f16`
//!    working copy;
//! 2. the forward pass runs on the working copy, and the backward pass starts from the loss's
//!    gradient set to the [`GradScaler`]'s scale `s` instead of 1, so that small gradients stay
//!    above `f16`'s smallest normal number (6·10⁻⁵) on their way down;
//! 3. every gradient is cast to `f32`, divided by `s` and written into the master gradients,
//!    and buffers that are not trained (BatchNorm's running statistics) are copied back;
//! 4. if any gradient was infinite or NaN, the step is skipped (the optimizer does not run) and
//!    `s` halves; after [`GradScaler::growth_interval`] finite steps in a row, `s` doubles.
//!
//! The precision-sensitive parts run in `f32` or `f64` whatever the element type, on the CPU:
//! the matrix products accumulate in `f32` (gemm converts `f16` panels), the norms'
//! statistics and the cross-entropy's softmax and sums are computed in `f64`. Other devices
//! compose dfdx ops in the element type.
//!
//! One difference from PyTorch: there the loss is an `f32` value and the scale multiplies it
//! in `f32`. dfdx records a tape in a single element type, so here the loss is an `f16` tensor
//! and its gradient `s` must be an `f16` number: the scale starts at, and never grows past,
//! 2¹⁵ (PyTorch starts at 2¹⁶, the first power of two above `f16`'s largest value, 65504).

use crate::optim::buffers::{axpby, scale as scale_buffer};
use crate::Error;
use dfdx::dtypes::f16;
use dfdx::nn::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorRef,
    ZeroGrads,
};
use dfdx::shapes::{Dtype, Rank0, Shape};
use dfdx::tensor::{Cpu, Gradients, HasErr, OwnedTape, PutTape, SplitTape, Storage, Tape, Tensor};
use dfdx::tensor_ops::{Backward, Device, SumTo};
use serde::{Deserialize, Serialize};
use std::any::Any;

/// The half-precision element type of the working copy.
pub type Half = f16;

/// A device that casts between `f32` and `f16`: the CPU, and CUDA in a build with the `cuda`
/// feature. (dfdx's own cast bound is crate-private, so generic code names this one.)
pub trait MixedDevice: Device<f32> + Device<f16> {
    /// `t` in `f16` (rounded to nearest; out of range becomes infinite).
    fn to_half<S: Shape>(t: Tensor<S, f32, Self>) -> Result<Tensor<S, f16, Self>, Self::Err>;
    /// `t` in `f32` (exact).
    fn to_single<S: Shape>(t: Tensor<S, f16, Self>) -> Result<Tensor<S, f32, Self>, Self::Err>;
}

impl MixedDevice for Cpu {
    fn to_half<S: Shape>(t: Tensor<S, f32, Self>) -> Result<Tensor<S, f16, Self>, Self::Err> {
        t.try_to_dtype()
    }
    fn to_single<S: Shape>(t: Tensor<S, f16, Self>) -> Result<Tensor<S, f32, Self>, Self::Err> {
        t.try_to_dtype()
    }
}

#[cfg(feature = "cuda")]
impl MixedDevice for dfdx::tensor::Cuda {
    fn to_half<S: Shape>(t: Tensor<S, f32, Self>) -> Result<Tensor<S, f16, Self>, Self::Err> {
        t.try_to_dtype()
    }
    fn to_single<S: Shape>(t: Tensor<S, f16, Self>) -> Result<Tensor<S, f32, Self>, Self::Err> {
        t.try_to_dtype()
    }
}

/// The `f16` working copy of a model: the same tensors, cast, under new identities.
pub fn half_copy<M, D>(model: &M) -> Result<M::To<f16, D>, D::Err>
where
    D: MixedDevice,
    M: TensorCollection<f32, D>,
{
    let copy = M::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut ToHalf { kept: None },
    })?;
    Ok(copy.expect("a mapping walk returns the copy"))
}

/// Casts every tensor to `f16`, building the cast model, and keeps each cast tensor in `kept`
/// (in the walk's order) when it is `Some`.
struct ToHalf {
    kept: Option<Vec<Box<dyn Any>>>,
}

impl<D: MixedDevice> TensorVisitor<f32, D> for ToHalf {
    type Viewer = ViewTensorRef;
    type Err = <D as HasErr>::Err;
    type E2 = f16;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        _: TensorOptions<S, f32, D>,
        t: &Tensor<S, f32, D>,
    ) -> Result<Option<Tensor<S, f16, D>>, Self::Err> {
        let half = D::to_half(t.clone())?;
        if let Some(kept) = &mut self.kept {
            kept.push(Box::new(half.clone()));
        }
        Ok(Some(half))
    }
}

/// Dynamic loss scaling, with `torch.amp.GradScaler`'s rules (see the [module
/// documentation](self) for the one difference, the scale's ceiling).
///
/// Its state is part of a checkpoint, so that a resumed run scales as an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    /// The current scale `s`: the loss's gradient at the start of the backward pass.
    pub scale: f64,
    /// What `s` is multiplied by after `growth_interval` finite steps in a row (PyTorch: 2).
    pub growth_factor: f64,
    /// What `s` is multiplied by after a step with infinite or NaN gradients (PyTorch: 0.5).
    pub backoff_factor: f64,
    /// Finite steps in a row before `s` grows (PyTorch: 2000).
    pub growth_interval: usize,
    /// The largest scale: 2¹⁵, the largest power of two that `f16` holds.
    pub max_scale: f64,
    /// Finite steps since the scale last changed.
    pub growth_tracker: usize,
    /// Steps skipped so far because their gradients were not finite.
    pub skipped_steps: usize,
    /// Steps skipped in a row, up to the last one.
    pub skipped_in_a_row: usize,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler {
            scale: 32768.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            max_scale: 32768.0,
            growth_tracker: 0,
            skipped_steps: 0,
            skipped_in_a_row: 0,
        }
    }
}

impl GradScaler {
    /// After this many skipped steps in a row the run stops: the scale has fallen by 2³⁰, so
    /// what overflows is the forward pass itself, which scaling cannot help.
    pub const MAX_SKIPPED_IN_A_ROW: usize = 30;

    /// Takes the outcome of a step: backs off and counts the step as skipped when
    /// `found_inf`, otherwise counts it towards growth.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            self.skipped_steps += 1;
            self.skipped_in_a_row += 1;
        } else {
            self.skipped_in_a_row = 0;
            self.growth_tracker += 1;
            if self.growth_tracker >= self.growth_interval {
                self.scale = (self.scale * self.growth_factor).min(self.max_scale);
                self.growth_tracker = 0;
            }
        }
    }

    /// An error when the last [`MAX_SKIPPED_IN_A_ROW`](Self::MAX_SKIPPED_IN_A_ROW) steps
    /// were all skipped.
    pub fn check(&self) -> Result<(), Error> {
        if self.skipped_in_a_row >= Self::MAX_SKIPPED_IN_A_ROW {
            return Err(Error::Config(format!(
                "mixed precision: the last {} steps all had infinite or NaN gradients (loss \
                 scale now {:e}), so the half-precision forward pass itself overflows; train \
                 with --dtype f32, or lower --lr",
                self.skipped_in_a_row, self.scale
            )));
        }
        Ok(())
    }
}

/// The mixed-precision side of a [`Task`](crate::train::Task), for
/// [`Trainer::run_mixed`](crate::train::Trainer::run_mixed): the same batch as
/// `train_step`, on the `f16` working copy `H` of the model, stopping at the loss.
pub trait MixedTask<H, D: Device<f16>> {
    /// The mean loss of step `step`'s training batch (the batch `train_step` would take) on
    /// `model` in training mode, on a tape from `grads`, and the items the batch held. The
    /// trainer runs the backward pass, with the loss scale.
    #[allow(clippy::type_complexity)]
    fn half_loss(
        &mut self,
        model: &mut H,
        step: usize,
        grads: Gradients<f16, D>,
    ) -> Result<(Tensor<Rank0, f16, D, OwnedTape<f16, D>>, usize), Error>;
}

/// What [`mixed_step`] computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixedOutcome {
    /// The batch's loss (the `f16` value, unscaled).
    pub loss: f64,
    /// Items the batch held.
    pub items: usize,
    /// Whether a gradient (or the loss) was infinite or NaN: the optimizer must skip the step.
    pub found_inf: bool,
}

/// `loss.backward()`, with the loss's own gradient set to `scale` instead of 1.
///
/// `scale` must be a value `E` holds exactly (a power of two within its range), as every
/// gradient of the pass is multiplied by it.
pub fn scaled_backward<E: Dtype, D: Device<E>>(
    loss: Tensor<Rank0, E, D, OwnedTape<E, D>>,
    scale: f64,
) -> Result<Gradients<E, D>, D::Err> {
    let (loss, mut tape) = loss.split_tape();
    let ghost = loss.ghost();
    let dev = loss.device().clone();
    // `try_backward` appends the op that sets the loss's gradient to 1; the tape runs from its
    // end, so this op, added before it, runs right after it, and before the loss's own op.
    tape.add_backward_op(move |grads| {
        let buf = grads.get_or_alloc_mut(&ghost)?;
        scale_buffer(&dev, buf, (), scale)
    });
    loss.put_tape(tape).try_backward()
}

/// Copies the master weights into the working copy `work`, cast to `f16`: every tensor is
/// replaced (under a new identity), and the layers' other settings (an RMSNorm's `eps`, a
/// BatchNorm's momentum) stay as `work` has them.
pub fn refresh_half_copy<M, D>(master: &M, work: &mut M::To<f16, D>) -> Result<(), Error>
where
    D: MixedDevice,
    M: TensorCollection<f32, D>,
    M::To<f16, D>: TensorCollection<f16, D>,
    Error: From<<D as HasErr>::Err>,
{
    let mut cast = ToHalf {
        kept: Some(Vec::new()),
    };
    M::iter_tensors(&mut RecursiveWalker {
        m: master,
        f: &mut cast,
    })?;
    let mut assign = Assign {
        values: cast.kept.unwrap_or_default().into_iter(),
        mismatch: false,
    };
    <M::To<f16, D> as TensorCollection<f16, D>>::iter_tensors(&mut RecursiveWalker {
        m: work,
        f: &mut assign,
    })?;
    if assign.mismatch {
        return Err(mismatch());
    }
    Ok(())
}

fn mismatch() -> Error {
    Error::Shape(
        "mixed precision: the f16 working copy's tensors do not match the model's; build it \
         with `model.to_dtype::<f16>()`"
            .into(),
    )
}

/// One mixed-precision forward and backward pass.
///
/// `work` is the `f16` working copy of `master` (from `master.to_dtype::<f16>()`, with the
/// same layer settings); its weights are refreshed from `master` first. `run` gets it and a
/// tape, and returns the batch's loss and its number of items. The master gradients `grads`
/// (zeroed by the caller) receive the unscaled `f32` gradients; when a gradient is not finite,
/// `found_inf` is set and `grads` must not be applied. The working copy's untrained buffers
/// (running statistics) are copied into `master`.
pub fn mixed_step<M, D, F>(
    master: &mut M,
    work: &mut M::To<f16, D>,
    grads: &mut Gradients<f32, D>,
    scaler: &GradScaler,
    run: F,
) -> Result<MixedOutcome, Error>
where
    D: MixedDevice,
    M: TensorCollection<f32, D>,
    M::To<f16, D>: TensorCollection<f16, D> + ZeroGrads<f16, D>,
    F: FnOnce(
        &mut M::To<f16, D>,
        Gradients<f16, D>,
    ) -> Result<(Tensor<Rank0, f16, D, OwnedTape<f16, D>>, usize), Error>,
    Error: From<<D as HasErr>::Err>,
{
    refresh_half_copy(master, work)?;
    let tape_grads = work.try_alloc_grads()?;
    let (loss, items) = run(work, tape_grads)?;
    let value = loss.as_vec()[0].to_f64();
    let mut half_grads = scaled_backward(loss, scaler.scale)?;

    let mut collect = Collect {
        grads: &mut half_grads,
        out: Vec::new(),
    };
    <M::To<f16, D> as TensorCollection<f16, D>>::iter_tensors(&mut RecursiveWalker {
        m: &*work,
        f: &mut collect,
    })?;
    let mut write = Write {
        grads,
        values: collect.out.into_iter(),
        inv_scale: 1.0 / scaler.scale,
        found_inf: !value.is_finite(),
        mismatch: false,
    };
    M::iter_tensors(&mut RecursiveWalker {
        m: master,
        f: &mut write,
    })?;
    if write.mismatch {
        return Err(mismatch());
    }
    Ok(MixedOutcome {
        loss: value,
        items,
        found_inf: write.found_inf,
    })
}

/// Visits the working copy in the same order as [`ToHalf`] visited the master: replaces each
/// tensor by the cast one.
struct Assign<I> {
    values: I,
    mismatch: bool,
}

impl<D, I> TensorVisitor<f16, D> for Assign<I>
where
    D: MixedDevice,
    I: Iterator<Item = Box<dyn Any>>,
{
    type Viewer = ViewTensorMut;
    type Err = <D as HasErr>::Err;
    type E2 = f16;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        _: TensorOptions<S, f16, D>,
        t: &mut Tensor<S, f16, D>,
    ) -> Result<Option<Tensor<S, f16, D>>, Self::Err> {
        match self
            .values
            .next()
            .and_then(|v| v.downcast::<Tensor<S, f16, D>>().ok())
        {
            Some(v) => *t = *v,
            None => self.mismatch = true,
        }
        Ok(None)
    }
}

/// Visits the working copy: each trainable tensor's gradient, and each other tensor's value,
/// cast to `f32`, in the walk's order.
struct Collect<'a, D: Storage<f16>> {
    grads: &'a mut Gradients<f16, D>,
    out: Vec<Box<dyn Any>>,
}

impl<D: MixedDevice> TensorVisitor<f16, D> for Collect<'_, D> {
    type Viewer = ViewTensorRef;
    type Err = <D as HasErr>::Err;
    type E2 = f16;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f16, D>,
        t: &Tensor<S, f16, D>,
    ) -> Result<Option<Tensor<S, f16, D>>, Self::Err> {
        let v = if opts.do_gradient_update {
            // Zeros where the loss did not reach the parameter.
            self.grads.try_alloc_for(t)?;
            self.grads.get(t)
        } else {
            t.clone()
        };
        let v = D::to_single(v)?;
        self.out.push(Box::new(v));
        Ok(None)
    }
}

/// Visits the master model in the same order as [`Collect`] visited its copy: writes each
/// gradient, divided by the scale, into the master gradients; copies the untrained values.
struct Write<'a, D: Storage<f32>, I> {
    grads: &'a mut Gradients<f32, D>,
    values: I,
    inv_scale: f64,
    found_inf: bool,
    mismatch: bool,
}

impl<D, I> TensorVisitor<f32, D> for Write<'_, D, I>
where
    D: Device<f32>,
    I: Iterator<Item = Box<dyn Any>>,
{
    type Viewer = ViewTensorMut;
    type Err = D::Err;
    type E2 = f32;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, D>,
        t: &mut Tensor<S, f32, D>,
    ) -> Result<Option<Tensor<S, f32, D>>, D::Err> {
        let Some(v) = self
            .values
            .next()
            .and_then(|v| v.downcast::<Tensor<S, f32, D>>().ok())
        else {
            self.mismatch = true;
            return Ok(None);
        };
        if opts.do_gradient_update {
            // A finite f16 value is at most 65504, so an f32 sum of them cannot overflow:
            // the sum is finite exactly when every element is.
            let sum = v.clone().try_sum::<Rank0, _>()?.as_vec()[0];
            self.found_inf |= !sum.is_finite();
            axpby(self.grads.get_or_alloc_mut(t)?, 0.0, *v, self.inv_scale)?;
        } else {
            // In place, so that the tensor keeps its identity.
            t.copy_from(&v.as_vec());
        }
        Ok(None)
    }
}
