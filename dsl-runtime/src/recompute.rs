//! Gradient checkpointing: a layer whose activations are recomputed in the backward pass
//! instead of being kept from the forward pass.
//!
//! In a model, mark the layer (a repeated block is checkpointed block by block):
//!
//! ```
//! use neural_arch::prelude::*;
//!
//! model! {
//!     pub struct Block<const D: usize> {
//!         ln: LayerNorm<D>,
//!         fc: Linear<D, D>,
//!     }
//!     forward(x: [B, T, D]) -> [B, T, D] {
//!         x + fc(ln(x))
//!     }
//! }
//!
//! model! {
//!     pub struct Trunk<const D: usize> {
//!         #[recompute]
//!         blocks: [Block<D>; 4],
//!         ln_f: LayerNorm<D>,
//!     }
//!     forward(x: [B, T, D]) -> [B, T, D];
//! }
//! ```
//!
//! With recomputation switched on ([`set_enabled`]`(true)`, a trainer's `--recompute`),
//! training (`forward_mut` with a gradient tape) then keeps only each block's input: the block
//! runs without a tape, and when the backward pass reaches its output it runs the block again
//! from that input with a tape of its own, back-propagates the output's gradient through it, and
//! adds the gradients of the input and of the block's parameters to the outer ones. The
//! gradients are those of the plain model (the same operations on the same values); the cost is
//! one more forward pass of the block. Inference (`forward`) is unchanged.
//!
//! The recomputation draws the same dropout masks as the first pass (the mask generator's state
//! is saved with the input), and it runs on a copy of the block that shares the parameters, so
//! BatchNorm's running statistics are updated once, by the first pass. The copy and the input
//! are released as soon as the block's backward pass has run, before the optimizer step.

use crate::layers::dropout;
use crate::optim::buffers::axpby;
use crate::Error;
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorRef,
};
use dfdx::nn::ModuleMut;
use dfdx::shapes::{Dtype, Rank0, Shape};
use dfdx::tensor::{
    Gradients, NoneTape, OwnedTape, PutTape, SplitTape, Storage, Tape, Tensor, Trace,
};
use dfdx::tensor_ops::{Backward, Device, SumTo, TryMul};
use std::cell::{Cell, RefCell};

thread_local! {
    /// The first error of a recomputation in the backward pass, until [`take_error`] reads it.
    static ERROR: RefCell<Option<Error>> = const { RefCell::new(None) };
    /// Whether `#[recompute]` layers recompute on this thread ([`set_enabled`]).
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Switches recomputation on or off for the `#[recompute]` layers run on this thread (off by
/// default): off, they keep their activations like any other layer. The model declares where
/// recomputation may happen, the run decides whether, as Hugging Face's
/// `gradient_checkpointing_enable()` does; the trainers expose it as `--recompute`.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// Whether `#[recompute]` layers recompute on this thread.
pub fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// The error of a recomputation during the last backward pass on this thread, if one failed,
/// and clears it. A backward operation can only report the device's own error type, so a
/// failure there (which would have failed the forward pass first, as the recomputation repeats
/// it on the same input) is kept here; its gradients are then incomplete, and
/// [`Trainer`](crate::train::Trainer) stops with this error instead of taking the step.
pub fn take_error() -> Option<Error> {
    ERROR.with(|e| e.borrow_mut().take())
}

/// `m` on `x`, keeping only `x` (and the state of the dropout masks) for the backward pass,
/// where `m` runs again to compute its gradients: see the [module documentation](self).
/// Without a tape, or with recomputation switched off, it is `m.try_forward_mut(x)`.
pub fn recompute<M, S, S2, E, D, T>(
    m: &mut M,
    x: Tensor<S, E, D, T>,
) -> Result<Tensor<S2, E, D, T>, Error>
where
    M: Clone
        + 'static
        + TensorCollection<E, D>
        + ModuleMut<Tensor<S, E, D, NoneTape>, Output = Tensor<S2, E, D, NoneTape>>
        + ModuleMut<Tensor<S, E, D, OwnedTape<E, D>>, Output = Tensor<S2, E, D, OwnedTape<E, D>>>
        + ModuleMut<Tensor<S, E, D, T>, Output = Tensor<S2, E, D, T>>,
    <M as ModuleMut<Tensor<S, E, D, NoneTape>>>::Error: Into<Error>,
    <M as ModuleMut<Tensor<S, E, D, T>>>::Error: Into<Error>,
    <M as ModuleMut<Tensor<S, E, D, OwnedTape<E, D>>>>::Error: Into<Error>,
    S: Shape,
    S2: Shape,
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D>,
    Error: From<D::Err>,
{
    if T::OWNS_TAPE && !enabled() {
        // As any layer: the tape records the block's operations.
        return ModuleMut::<Tensor<S, E, D, T>>::try_forward_mut(m, x).map_err(Into::into);
    }
    let (x, mut tape) = x.split_tape();
    let masks = dropout::masks_state();
    let y = ModuleMut::<Tensor<S, E, D, NoneTape>>::try_forward_mut(m, x.clone())
        .map_err(Into::into)?;
    if T::OWNS_TAPE {
        let module = m.clone();
        let y_ghost = y.ghost();
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&y_ghost)?;
            let g_y = grads.get(&y_ghost);
            let mut module = module;
            let inner = dropout::with_masks_state(masks, || -> Result<_, Error> {
                let y = ModuleMut::<Tensor<S, E, D, OwnedTape<E, D>>>::try_forward_mut(
                    &mut module,
                    x.clone().leaky_traced(),
                )
                .map_err(Into::into)?;
                Ok(y.try_mul(g_y)?.try_sum::<Rank0, _>()?.try_backward()?)
            });
            let mut inner = match inner {
                Ok(inner) => inner,
                Err(e) => {
                    ERROR.with(|slot| {
                        slot.borrow_mut().get_or_insert(e);
                    });
                    return Ok(());
                }
            };
            inner.try_alloc_for(&x)?;
            axpby(grads.get_or_alloc_mut(&x)?, 1.0, inner.get(&x), 1.0)?;
            M::iter_tensors(&mut RecursiveWalker {
                m: &module,
                f: &mut AddGrads {
                    inner: &mut inner,
                    outer: grads,
                },
            })?;
            Ok(())
        });
    }
    Ok(y.put_tape(tape))
}

/// Adds each trainable parameter's gradient in `inner` (the recomputation's) to `outer`.
struct AddGrads<'a, E: Dtype, D: Storage<E>> {
    inner: &'a mut Gradients<E, D>,
    outer: &'a mut Gradients<E, D>,
}

impl<E: Dtype, D: Device<E>> TensorVisitor<E, D> for AddGrads<'_, E, D> {
    type Viewer = ViewTensorRef;
    type Err = D::Err;
    type E2 = E;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, E, D>,
        p: &Tensor<S, E, D>,
    ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
        if !opts.do_gradient_update {
            return Ok(None);
        }
        // Zeros where the recomputation did not reach the parameter.
        self.inner.try_alloc_for(p)?;
        axpby(self.outer.get_or_alloc_mut(p)?, 1.0, self.inner.get(p), 1.0)?;
        Ok(None)
    }
}
