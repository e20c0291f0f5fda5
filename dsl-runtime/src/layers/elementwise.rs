//! The element-wise `+` of `model!` forward bodies (residual connections) on the CPU: one
//! parallel pass each way. dfdx's `add` walks both operands with strided indices on the calling
//! thread and allocates a zeroed output first; on two threads the residual adds of a
//! transformer were a good part of what stayed serial.

use super::cpu_fast::{cpu_vec, for_chunks, fused_cpu, read, CPU, TASK_ELEMS};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{Merge, PutTape, SplitTape, Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo, TryAdd};

/// `a + b` for two tensors of one shape: on the CPU (any element type) one fused pass, with
/// the gradient of the output added to both operands' in parallel; elsewhere dfdx's `add`.
pub(crate) fn add<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    a: Tensor<S, E, D, T>,
    b: Tensor<S, E, D, T>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    let shape = *a.shape();
    // Below a task's worth of elements dfdx's loop is as fast as the copies.
    if !fused_cpu::<E, D>() || shape.num_elements() < TASK_ELEMS {
        return a.try_add(b);
    }
    // Free for contiguous operands; a strided view is copied, on the tape, into row-major order.
    let (a, ta) = a.try_reshape_like(&shape)?.split_tape();
    let (b, tb) = b.try_reshape_like(&shape)?.split_tape();
    let mut tape = ta.merge(tb);
    let mut out: Vec<E> = read(&a);
    {
        let bs: Vec<E> = read(&b);
        for_chunks(&mut out, TASK_ELEMS, |i, out| {
            let bs = &bs[i * TASK_ELEMS..];
            out.iter_mut().zip(bs).for_each(|(o, &v)| *o += v);
        });
    }
    let out = a.device().try_tensor_from_vec(out, shape)?;
    if T::OWNS_TAPE {
        let (a, b, out_ghost) = (a.ghost(), b.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            for t in [&a, &b] {
                let g = cpu_vec::<E, D>(grads.get_or_alloc_mut(t)?).expect(CPU);
                for_chunks(g, TASK_ELEMS, |i, g| {
                    let go = &g_out[i * TASK_ELEMS..];
                    g.iter_mut().zip(go).for_each(|(g, &v)| *g += v);
                });
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
}
