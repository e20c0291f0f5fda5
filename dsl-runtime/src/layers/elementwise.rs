//! The element-wise `+` of `model!` forward bodies (residual connections) on the CPU: one
//! parallel pass each way. dfdx's `add` walks both operands with strided indices on the calling
//! thread and allocates a zeroed output first; on two threads the residual adds of a
//! transformer were a good part of what stayed serial.

use super::cast;
use super::cpu_fast::{as_f, cpu_vec, fused_stored, read, stored_call, Stored, CPU, TASK_ELEMS};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{Merge, PutTape, SplitTape, Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo, TryAdd};
use std::any::Any;

/// `a + b` for two tensors of one shape: on the CPU (`f32`, `f64`, `f16`, `bf16`) one fused
/// pass, with the gradient of the output added to both operands' in parallel; elsewhere dfdx's
/// `add`.
pub(crate) fn add<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    a: Tensor<S, E, D, T>,
    b: Tensor<S, E, D, T>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    // Below a task's worth of elements dfdx's loop is as fast as the copies.
    if !fused_stored::<E, D>() || a.shape().num_elements() < TASK_ELEMS {
        return a.try_add(b);
    }
    stored_call!(E, add_cpu::<_, S, E, D, T>(a, b))
}

/// [`add`] on the CPU, in the element type `St` = `E` ([`Stored::add_assign_all`]).
fn add_cpu<St: Stored, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    a: Tensor<S, E, D, T>,
    b: Tensor<S, E, D, T>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    let shape = *a.shape();
    // Free for contiguous operands; a strided view is copied, on the tape, into row-major order.
    let (a, ta) = a.try_reshape_like(&shape)?.split_tape();
    let (b, tb) = b.try_reshape_like(&shape)?.split_tape();
    let mut tape = ta.merge(tb);
    let mut out: Vec<St> = read(&a);
    St::add_assign_all(&mut out, &read::<_, E, D, St>(&b));
    let out = a.device().try_tensor_from_vec(cast::<St, E>(out), shape)?;
    if T::OWNS_TAPE {
        let (a, b, out_ghost) = (a.ghost(), b.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            {
                let go: &Vec<St> = (&g_out as &dyn Any).downcast_ref().expect(CPU);
                for t in [&a, &b] {
                    let g = as_f::<E, St>(cpu_vec::<E, D>(grads.get_or_alloc_mut(t)?).expect(CPU));
                    St::add_assign_all(g, go);
                }
            }
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::super::cpu_fast::both_paths;
    use crate::prelude::*;

    #[test]
    fn fused_add_matches_dfdx_forward_and_backward() {
        both_paths(|path| {
            let dev = Cpu::seed_from_u64(4);
            // Above one task, and an operand that is a permuted (strided) view.
            let a: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(300, 257));
            let b: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(257, 300));
            let w: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(300, 257));
            let bt = b.leaky_trace().permute::<_, Axes2<1, 0>>();
            let y = super::add(a.leaky_trace(), bt).unwrap();
            let want: Vec<f64> = a
                .as_vec()
                .iter()
                .zip(b.clone().permute::<_, Axes2<1, 0>>().as_vec())
                .map(|(a, b)| a + b)
                .collect();
            assert_eq!(y.as_vec(), want, "{path}");
            let g = (y * w.clone()).sum::<Rank0, _>().backward();
            assert_eq!(g.get(&a).as_vec(), w.as_vec(), "{path}: da = w");
            let wt = w.clone().permute::<_, Axes2<1, 0>>().as_vec();
            assert_eq!(g.get(&b).as_vec(), wt, "{path}: db = wᵀ");
        });
    }

    /// `f16` and `bf16`: the block-wise conversions give `half`'s own `+` bit for bit, forward
    /// and in both operands' gradients (accumulated over two uses of `a`).
    #[test]
    fn half_add_equals_halfs_add_bit_for_bit() {
        fn check<H: crate::Elem>()
        where
            Cpu: Device<H>,
        {
            let dev = Cpu::default();
            let n = 3 * super::TASK_ELEMS + 17;
            let wave = |phase: f64| -> Vec<H> {
                let v = |k: usize| 3.0 * (0.37 * k as f64 + phase).sin() * (k % 13) as f64;
                (0..n).map(|k| H::from_f64(v(k)).unwrap()).collect()
            };
            let a = dev.tensor_from_vec(wave(0.0), (n,));
            let b = dev.tensor_from_vec(wave(1.0), (n,));
            let w = dev.tensor_from_vec(wave(2.0), (n,));
            let run = || {
                let y = super::add(a.leaky_trace(), b.leaky_trace()).unwrap();
                let y = super::add(y, a.leaky_trace()).unwrap();
                let values = y.as_vec();
                let g = (y * w.clone()).sum::<Rank0, _>().backward();
                let bits = |v: Vec<H>| v.iter().map(|x| x.to_f64().unwrap().to_bits()).collect();
                let all: [Vec<u64>; 3] = [
                    bits(values),
                    bits(g.get(&a).as_vec()),
                    bits(g.get(&b).as_vec()),
                ];
                all
            };
            let fused = run();
            let composed = super::super::cpu_fast::composition_only(run);
            assert_eq!(fused, composed);
        }
        check::<half::f16>();
        check::<half::bf16>();
    }
}
