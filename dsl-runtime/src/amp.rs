//! Mixed precision training: `f32` master weights, forward and backward passes in a half
//! precision type `H` ([`HalfFloat`]: `f16` or `bf16`), and dynamic loss scaling, as
//! `torch.amp` with `GradScaler` does.
//!
//! Each step ([`mixed_step`]):
//!
//! 1. the master weights (the model the optimizer updates, in `f32`) are cast to a fresh `H`
//!    working copy;
//! 2. the forward pass runs on the working copy, and the backward pass starts from the loss's
//!    gradient set to the [`GradScaler`]'s scale `s` instead of 1, so that small gradients stay
//!    above `f16`'s smallest normal number (6·10⁻⁵) on their way down;
//! 3. every gradient is cast to `f32`, divided by `s` and written into the master gradients,
//!    and buffers that are not trained (BatchNorm's running statistics) are copied back;
//! 4. if any gradient was infinite or NaN, the step is skipped (the optimizer does not run) and
//!    `s` halves; after [`GradScaler::growth_interval`] finite steps in a row, `s` doubles.
//!
//! `bf16` has `f32`'s exponent range, so nothing underflows that `f32` would keep: as PyTorch
//! advises, it trains without scaling (its [`GradScaler`] starts at, and never grows past, 1),
//! and an overflowing step is still skipped and counted.
//!
//! The precision-sensitive parts run in `f32` or `f64` whatever the element type, on the CPU,
//! as PyTorch's CPU autocast computes them: the fully connected layers and the attention
//! kernels widen their half inputs to `f32` for `faer`'s products, keep the softmax in `f32`,
//! and round each output and each gradient once; the activations compute in `f32`; the norms'
//! statistics and the cross-entropy's softmax and sums are computed in `f64`. Activations are
//! kept for the backward pass in `H`, which is where the memory goes. Other devices compose
//! dfdx ops in the element type.
//!
//! One difference from PyTorch: there the loss is an `f32` value and the scale multiplies it
//! in `f32`. dfdx records a tape in a single element type, so here the loss is an `f16` tensor
//! and its gradient `s` must be an `f16` number: the scale starts at, and never grows past,
//! 2¹⁵ (PyTorch starts at 2¹⁶, the first power of two above `f16`'s largest value, 65504).

use crate::optim::buffers::{axpby, scale as scale_buffer};
use crate::Error;
use dfdx::dtypes::{bf16, f16};
use dfdx::nn::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorRef,
    ZeroGrads,
};
use dfdx::shapes::{Dtype, Rank0, Shape};
use dfdx::tensor::{Cpu, Gradients, HasErr, OwnedTape, PutTape, SplitTape, Storage, Tape, Tensor};
use dfdx::tensor_ops::{Backward, Device, SumTo, TryMul};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::marker::PhantomData;

/// The default half-precision element type of the working copy (`--dtype f16`).
pub type Half = f16;

/// A half-precision element type that mixed precision runs the forward and backward passes in:
/// [`f16`](struct@f16) (10 bits of mantissa, largest value 65504: needs loss scaling) or
/// [`bf16`] (7 bits of mantissa, `f32`'s range: needs none).
pub trait HalfFloat: crate::Elem {
    /// Its name, as `--dtype` takes it.
    const NAME: &'static str;
    /// The loss scaling a run in this type starts with.
    fn scaler() -> GradScaler;
    /// `x` rounded to this type (to nearest; out of range becomes infinite).
    fn from_single(x: f32) -> Self;
}

impl HalfFloat for f16 {
    const NAME: &'static str = "f16";
    fn scaler() -> GradScaler {
        GradScaler::default()
    }
    fn from_single(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl HalfFloat for bf16 {
    const NAME: &'static str = "bf16";
    fn scaler() -> GradScaler {
        GradScaler {
            scale: 1.0,
            max_scale: 1.0,
            ..GradScaler::default()
        }
    }
    fn from_single(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A device that casts between `f32` and the half type `H`: the CPU, and CUDA in a build with
/// the `cuda` feature. (dfdx's own cast bound is crate-private, so generic code names this one.)
pub trait MixedDevice<H: HalfFloat = f16>: Device<f32> + Device<H> {
    /// `t` in `H` (rounded to nearest; out of range becomes infinite).
    fn to_half<S: Shape>(t: Tensor<S, f32, Self>) -> Result<Tensor<S, H, Self>, Self::Err>;
    /// `t` in `f32` (exact).
    fn to_single<S: Shape>(t: Tensor<S, H, Self>) -> Result<Tensor<S, f32, Self>, Self::Err>;
}

impl<H: HalfFloat> MixedDevice<H> for Cpu
where
    Cpu: Device<H>,
{
    fn to_half<S: Shape>(t: Tensor<S, f32, Self>) -> Result<Tensor<S, H, Self>, Self::Err> {
        t.try_to_dtype()
    }
    fn to_single<S: Shape>(t: Tensor<S, H, Self>) -> Result<Tensor<S, f32, Self>, Self::Err> {
        t.try_to_dtype()
    }
}

#[cfg(feature = "cuda")]
impl<H: HalfFloat> MixedDevice<H> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<H>,
{
    fn to_half<S: Shape>(t: Tensor<S, f32, Self>) -> Result<Tensor<S, H, Self>, Self::Err> {
        t.try_to_dtype()
    }
    fn to_single<S: Shape>(t: Tensor<S, H, Self>) -> Result<Tensor<S, f32, Self>, Self::Err> {
        t.try_to_dtype()
    }
}

/// A device that runs mixed precision in either half type (the bound the trainers take, which
/// choose the type at run time from `--dtype`).
pub trait HalfDevice: MixedDevice<f16> + MixedDevice<bf16> {}

impl<D: MixedDevice<f16> + MixedDevice<bf16>> HalfDevice for D {}

/// The `H` working copy of a model: the same tensors, cast, under new identities.
pub fn half_copy<H, M, D>(model: &M) -> Result<M::To<H, D>, D::Err>
where
    H: HalfFloat,
    D: MixedDevice<H>,
    M: TensorCollection<f32, D>,
{
    let copy = M::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut ToHalf::<H> {
            kept: None,
            half: PhantomData,
        },
    })?;
    Ok(copy.expect("a mapping walk returns the copy"))
}

/// Casts every tensor to `H`, building the cast model, and keeps each cast tensor in `kept`
/// (in the walk's order) when it is `Some`.
struct ToHalf<H> {
    kept: Option<Vec<Box<dyn Any>>>,
    half: PhantomData<H>,
}

impl<H: HalfFloat, D: MixedDevice<H>> TensorVisitor<f32, D> for ToHalf<H> {
    type Viewer = ViewTensorRef;
    type Err = <D as HasErr>::Err;
    type E2 = H;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        _: TensorOptions<S, f32, D>,
        t: &Tensor<S, f32, D>,
    ) -> Result<Option<Tensor<S, H, D>>, Self::Err> {
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
    /// The largest scale: for `f16`, 2¹⁵, the largest power of two it holds; for `bf16`, 1.
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
/// `train_step`, on the working copy `W` of the model in the half type `H`, stopping at the
/// loss.
pub trait MixedTask<W, D: Device<H>, H: HalfFloat = f16> {
    /// The mean loss of step `step`'s training batch (the batch `train_step` would take) on
    /// `model` in training mode, on a tape from `grads`, and the items the batch held. The
    /// trainer runs the backward pass, with the loss scale.
    #[allow(clippy::type_complexity)]
    fn half_loss(
        &mut self,
        model: &mut W,
        step: usize,
        grads: Gradients<H, D>,
    ) -> Result<(Tensor<Rank0, H, D, OwnedTape<H, D>>, usize), Error>;
}

/// What [`mixed_step`] computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixedOutcome {
    /// The batch's loss (the half-precision value, unscaled).
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

/// Copies the master weights into the working copy `work`, cast to `H`: every tensor is
/// replaced (under a new identity), and the layers' other settings (an RMSNorm's `eps`, a
/// BatchNorm's momentum) stay as `work` has them.
pub fn refresh_half_copy<H, M, D>(master: &M, work: &mut M::To<H, D>) -> Result<(), Error>
where
    H: HalfFloat,
    D: MixedDevice<H>,
    M: TensorCollection<f32, D>,
    M::To<H, D>: TensorCollection<H, D>,
    Error: From<<D as HasErr>::Err>,
{
    let mut cast = ToHalf::<H> {
        kept: Some(Vec::new()),
        half: PhantomData,
    };
    M::iter_tensors(&mut RecursiveWalker {
        m: master,
        f: &mut cast,
    })?;
    let mut assign = Assign {
        values: cast.kept.unwrap_or_default().into_iter(),
        mismatch: false,
    };
    <M::To<H, D> as TensorCollection<H, D>>::iter_tensors(&mut RecursiveWalker {
        m: work,
        f: &mut assign,
    })?;
    if assign.mismatch {
        return Err(mismatch::<H>());
    }
    Ok(())
}

fn mismatch<H: HalfFloat>() -> Error {
    Error::Shape(format!(
        "mixed precision: the {0} working copy's tensors do not match the model's; build it \
         with `model.to_dtype::<{0}>()`",
        H::NAME
    ))
}

/// One mixed-precision forward and backward pass.
///
/// `work` is the working copy of `master` in the half type `H` (from
/// `master.to_dtype::<H>()`, with the same layer settings); its weights are refreshed from
/// `master` first. `run` gets it and a
/// tape, and returns the batch's loss and its number of items. The master gradients `grads`
/// (zeroed by the caller) receive the unscaled `f32` gradients; when a gradient is not finite,
/// `found_inf` is set and `grads` must not be applied. The working copy's untrained buffers
/// (running statistics) are copied into `master`.
pub fn mixed_step<H, M, D, F>(
    master: &mut M,
    work: &mut M::To<H, D>,
    grads: &mut Gradients<f32, D>,
    scaler: &GradScaler,
    run: F,
) -> Result<MixedOutcome, Error>
where
    H: HalfFloat,
    D: MixedDevice<H>,
    M: TensorCollection<f32, D>,
    M::To<H, D>: TensorCollection<H, D> + ZeroGrads<H, D>,
    F: FnOnce(
        &mut M::To<H, D>,
        Gradients<H, D>,
    ) -> Result<(Tensor<Rank0, H, D, OwnedTape<H, D>>, usize), Error>,
    Error: From<<D as HasErr>::Err>,
{
    refresh_half_copy(master, work)?;
    let tape_grads = work.try_alloc_grads()?;
    let (loss, items) = run(work, tape_grads)?;
    // half's conversions to f64 are exact and never None.
    let value = loss.as_vec()[0].to_f64().unwrap_or(f64::NAN);
    let mut half_grads = scaled_backward(loss, scaler.scale)?;

    let mut collect = Collect {
        grads: &mut half_grads,
        out: Vec::new(),
    };
    <M::To<H, D> as TensorCollection<H, D>>::iter_tensors(&mut RecursiveWalker {
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
        return Err(mismatch::<H>());
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

impl<H, D, I> TensorVisitor<H, D> for Assign<I>
where
    H: HalfFloat,
    D: MixedDevice<H>,
    I: Iterator<Item = Box<dyn Any>>,
{
    type Viewer = ViewTensorMut;
    type Err = <D as HasErr>::Err;
    type E2 = H;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        _: TensorOptions<S, H, D>,
        t: &mut Tensor<S, H, D>,
    ) -> Result<Option<Tensor<S, H, D>>, Self::Err> {
        match self
            .values
            .next()
            .and_then(|v| v.downcast::<Tensor<S, H, D>>().ok())
        {
            Some(v) => *t = *v,
            None => self.mismatch = true,
        }
        Ok(None)
    }
}

/// Visits the working copy: each trainable tensor's gradient, and each other tensor's value,
/// cast to `f32`, in the walk's order.
struct Collect<'a, H: HalfFloat, D: Storage<H>> {
    grads: &'a mut Gradients<H, D>,
    out: Vec<Box<dyn Any>>,
}

impl<H: HalfFloat, D: MixedDevice<H>> TensorVisitor<H, D> for Collect<'_, H, D> {
    type Viewer = ViewTensorRef;
    type Err = <D as HasErr>::Err;
    type E2 = H;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, H, D>,
        t: &Tensor<S, H, D>,
    ) -> Result<Option<Tensor<S, H, D>>, Self::Err> {
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
            // 0·x is 0 for a finite x and NaN for an infinite or NaN one, so this sum is
            // finite exactly when every element is (a plain sum of finite bf16 values can
            // overflow f32).
            let sum = (*v).clone().try_mul(0.0)?.try_sum::<Rank0, _>()?.as_vec()[0];
            self.found_inf |= !sum.is_finite();
            axpby(self.grads.get_or_alloc_mut(t)?, 0.0, *v, self.inv_scale)?;
        } else {
            // In place, so that the tensor keeps its identity.
            t.copy_from(&v.as_vec());
        }
        Ok(None)
    }
}
