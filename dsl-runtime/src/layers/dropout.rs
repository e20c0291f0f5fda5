//! Dropout with its probability in the type, and masks that a training run can reproduce.
//!
//! dfdx's own dropout draws its masks from the device's generator, whose state a checkpoint
//! cannot save, so a resumed run would drop other units than the uninterrupted one. Here the
//! masks come from a per-thread generator that [`seed_dropout`] re-seeds; the trainer seeds it
//! with the run's seed and the step before every step, which makes each step's masks a pure
//! function of `(seed, step)`.

use super::cpu_fast::{cpu_vec, filled, for_chunks, fused_cpu, par_rows, CPU, TASK_ELEMS};
use super::LayerInfo;
use dfdx::nn::{Module, ModuleMut, ZeroSizedModule};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{PutTape, SplitTape, Tape, Tensor, TensorFromVec};
use dfdx::tensor_ops::{Device, ReshapeTo, TryMul};
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, RngCore, SeedableRng};
use std::cell::RefCell;

thread_local! {
    static MASKS: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0));
}

/// Re-seeds this thread's dropout masks: the `forward_mut` calls that follow draw the same
/// masks for the same seed. [`Trainer`](crate::train::Trainer) calls it before each step.
pub fn seed_dropout(seed: u64) {
    MASKS.with(|m| *m.borrow_mut() = StdRng::seed_from_u64(seed));
}

/// The state of this thread's mask generator, for [`with_masks_state`].
pub(crate) fn masks_state() -> StdRng {
    MASKS.with(|m| m.borrow().clone())
}

/// Runs `f` with the mask generator in `state`, then puts the generator back as it was: a
/// recomputed layer draws the masks of its first pass.
pub(crate) fn with_masks_state<R>(state: StdRng, f: impl FnOnce() -> R) -> R {
    let saved = MASKS.with(|m| m.replace(state));
    let r = f();
    MASKS.with(|m| *m.borrow_mut() = saved);
    r
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
        let keep = E::from_f64(1.0 / (1.0 - p)).unwrap_or_default();
        let shape = *x.shape();
        let seed: u64 = MASKS.with(|m| m.borrow_mut().gen());
        let mask = mask_values(shape.num_elements(), seed, p, keep);
        if fused_cpu::<E, D>() && shape.num_elements() > 0 {
            return dropout_cpu(x, mask);
        }
        let mask = x.device().try_tensor_from_vec(mask, shape)?;
        x.try_mul(mask)
    }
}

/// `n` mask values, `0` with probability `p` and `keep` otherwise, drawn in blocks of
/// [`TASK_ELEMS`] on rayon's pool: block `i` from its own generator (`SmallRng`, xoshiro256++)
/// seeded by `seed` and `i`, so the mask depends on the seed alone, not on the number of
/// threads. Each 64-bit draw decides two elements (a unit is dropped when its 32 bits fall
/// below `p·2³²`): the mask was a twentieth of a BERT step when each element cost a ChaCha draw.
fn mask_values<E: Dtype>(n: usize, seed: u64, p: f64, keep: E) -> Vec<E> {
    let below = (p * 4_294_967_296.0).round() as u64;
    let mut mask = filled(n, E::default());
    for_chunks(
        &mut mask,
        TASK_ELEMS,
        #[inline(always)]
        |i, block| {
            let mut rng =
                SmallRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for pair in block.chunks_mut(2) {
                let bits = rng.next_u64();
                for (m, half) in pair.iter_mut().zip([bits & 0xFFFF_FFFF, bits >> 32]) {
                    if half >= below {
                        *m = keep;
                    }
                }
            }
        },
    );
    mask
}

/// `x ⊙ mask` on the CPU in one parallel pass each way (`dx += g ⊙ mask`), instead of dfdx's
/// `mul`, which broadcasts, allocates and loops on one thread.
fn dropout_cpu<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
    mask: Vec<E>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    let shape = *x.shape();
    // Free for a contiguous tensor; a strided view is copied, on the tape, into row-major order.
    let (x, mut tape) = x.try_reshape_like(&shape)?.split_tape();
    let mut out = filled(shape.num_elements(), E::default());
    x.copy_into(&mut out);
    par_rows(
        &mut out,
        1,
        #[inline(always)]
        |i0, out| {
            out.iter_mut().zip(&mask[i0..]).for_each(|(y, &m)| *y *= m);
        },
    );
    let out = x.device().try_tensor_from_vec(out, shape)?;
    if T::OWNS_TAPE {
        let (x, out_ghost) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            let g_x = cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU);
            par_rows(
                g_x,
                1,
                #[inline(always)]
                |i0, g_x| {
                    let each = g_x.iter_mut().zip(&g_out[i0..]).zip(&mask[i0..]);
                    each.for_each(|((gx, &g), &m)| *gx += g * m);
                },
            );
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
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

    #[test]
    fn the_fused_pass_equals_the_multiplication_by_the_mask() {
        use super::super::cpu_fast::composition_only;
        let dev = Cpu::seed_from_u64(5);
        // Larger than one block of masks, so that several generators take part.
        let x: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(300, 257));
        let w: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(300, 257));
        let run = || {
            super::seed_dropout(3);
            let y = Dropout::<30>.forward_mut(x.leaky_trace());
            let out = y.as_vec();
            let g = (y * w.clone()).sum::<Rank0, _>().backward();
            (out, g.get(&x).as_vec())
        };
        let (y, g) = run();
        assert_eq!((y.clone(), g.clone()), composition_only(run));
        // The gradient is the mask times the upstream gradient: 0 or 1/0.7 times w.
        for ((y, g), (x, w)) in y.iter().zip(&g).zip(x.as_vec().iter().zip(w.as_vec())) {
            let m = if *y == 0.0 { 0.0 } else { 1.0 / 0.7 };
            assert!((y - m * x).abs() < 1e-12 && (g - m * w).abs() < 1e-12);
        }
    }
}
