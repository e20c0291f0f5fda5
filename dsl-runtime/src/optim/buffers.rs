//! In-place arithmetic on dfdx gradient buffers (`D::Vec`), on any device.
//!
//! dfdx keeps gradients and optimizer moments in `Gradients`, as raw device buffers that only its
//! crate-private kernels can write. Two public doors lead in: on the CPU the buffer derefs to a
//! `Vec<E>`, which [`cpu_slice`] reaches by downcasting; on every device, [`axpby`] borrows
//! dfdx's public SGD update ([`SgdConfig::try_update`]), whose kernel computes
//! `v ← (g + λ·p) + μ·v` on a buffer `v`. With `g = 0` that is `v ← b·src + a·v`, exact (adding
//! zero changes nothing) and fused on both CPU and CUDA.

use dfdx::optim::{Momentum, SgdConfig, WeightDecay};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{Cpu, Storage, Tensor};
use dfdx::tensor_ops::Device;
use std::any::Any;

/// The buffer as a slice when `D` is the CPU, `None` on other devices.
pub(crate) fn cpu_slice<E: Dtype, D: Storage<E>>(buf: &mut D::Vec) -> Option<&mut [E]> {
    (buf as &mut dyn Any)
        .downcast_mut::<<Cpu as Storage<E>>::Vec>()
        .map(|v| &mut v[..])
}

/// `dst ← a·dst + b·src`, element by element; `dst` holds as many values as `src`.
///
/// With `a = 0` a non-finite old value would survive as `0·∞ = NaN`: zero `dst` first when
/// overwriting a buffer of unknown content.
pub(crate) fn axpby<S: Shape, E: Dtype, D: Device<E>>(
    dst: &mut <D as Storage<E>>::Vec,
    a: f64,
    mut src: Tensor<S, E, D>,
    b: f64,
) -> Result<(), D::Err> {
    let zeros = <D as Storage<E>>::try_alloc_len(src.device(), src.shape().num_elements())?;
    // lr = 0 leaves `src` (the kernel's parameter) as it was; only `dst` (its velocity) changes.
    let cfg = SgdConfig {
        lr: 0.0,
        momentum: Some(Momentum::Classic(a)),
        weight_decay: Some(WeightDecay::L2(b)),
    };
    cfg.try_update(&mut src, dst, &zeros)
}

/// `dst ← s·dst`.
pub(crate) fn scale<S: Shape, E: Dtype, D: Device<E>>(
    dev: &D,
    dst: &mut <D as Storage<E>>::Vec,
    shape: S,
    s: f64,
) -> Result<(), D::Err> {
    let zeros = dev.try_zeros_like(&shape)?;
    axpby(dst, s, zeros, 0.0)
}

/// `dst ← src`, exactly.
pub(crate) fn overwrite<S: Shape, E: Dtype, D: Device<E>>(
    dst: &mut <D as Storage<E>>::Vec,
    src: Tensor<S, E, D>,
) -> Result<(), D::Err> {
    src.device().try_fill_with_zeros(dst)?;
    axpby(dst, 0.0, src, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfdx::tensor::{Gradients, TensorFromVec};

    #[test]
    fn kernel_arithmetic_is_exact_and_the_cpu_slice_is_reachable() {
        let dev = Cpu::default();
        let key: Tensor<(usize,), f64, Cpu> = dev.tensor_from_vec(vec![0.0; 4], (4,));
        let mut grads = Gradients::<f64, Cpu>::leaky();
        let buf = grads.get_or_alloc_mut(&key).unwrap();
        let odd = [1.0 / 3.0, -7.25e-300, 1e300, -0.1];
        overwrite(buf, dev.tensor_from_vec(odd.to_vec(), (4,))).unwrap();
        assert_eq!(grads.get(&key).as_vec(), odd);

        let buf = grads.get_or_alloc_mut(&key).unwrap();
        axpby(
            buf,
            0.9,
            dev.tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0], (4,)),
            0.1,
        )
        .unwrap();
        let want: Vec<f64> = odd
            .iter()
            .zip([1.0, 2.0, 3.0, 4.0])
            .map(|(v, s)| 0.1 * s + 0.9 * v)
            .collect();
        assert_eq!(grads.get(&key).as_vec(), want);

        let buf = grads.get_or_alloc_mut(&key).unwrap();
        scale(&dev, buf, (4,), 0.5).unwrap();
        let half: Vec<f64> = want.iter().map(|v| 0.5 * v).collect();
        assert_eq!(grads.get(&key).as_vec(), half);

        let slice = cpu_slice::<f64, Cpu>(grads.get_or_alloc_mut(&key).unwrap()).unwrap();
        slice[0] = 2.0;
        assert_eq!(grads.get(&key).as_vec()[0], 2.0);
    }
}
