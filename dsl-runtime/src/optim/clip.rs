//! Clipping gradients by their global norm.

use super::buffers;
use crate::Error;
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorRef,
};
use dfdx::shapes::{Dtype, HasShape, Rank0, Shape};
use dfdx::tensor::{Gradients, Storage, Tensor};
use dfdx::tensor_ops::{Device, SumTo, TryAdd};

/// Scales the gradients of `model`'s trainable parameters in `grads` so that their global L2
/// norm (of all values of all parameters together) is at most `max_norm`, and returns the norm
/// they had:
///
/// ```text
/// n = √(Σ g²),   g ← g · min(1, max_norm / (n + 1e-6))
/// ```
///
/// PyTorch: `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`. When `n` is not
/// finite the gradients are left as they are (PyTorch's default would multiply them by NaN) and
/// `n` is returned: skip that step. A parameter without a gradient in `grads` gets a zero one.
/// `max_norm` must be positive (else [`Error::Config`]).
///
/// On the CPU the norm is summed in `f64`; elsewhere in the element type, with dfdx ops.
///
/// ```
/// use neural_arch::optim::clip_grad_norm;
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let p: Tensor<Rank1<2>, f64, _> = dev.tensor([3.0, 4.0]);
/// let mut grads = (p.leaky_trace() * 0.5).square().sum().backward(); // g = p / 2: norm 2.5
/// let norm = clip_grad_norm(&mut grads, &p, 1.0).unwrap();
/// assert!((norm - 2.5).abs() < 1e-12);
/// let g = grads.get(&p).array();
/// assert!((g[0] * g[0] + g[1] * g[1]).sqrt() < 1.0);
/// ```
pub fn clip_grad_norm<M, E, D>(
    grads: &mut Gradients<E, D>,
    model: &M,
    max_norm: f64,
) -> Result<f64, Error>
where
    M: TensorCollection<E, D>,
    E: Dtype,
    D: Device<E>,
    Error: From<D::Err>,
{
    clip(grads, model, max_norm, false)
}

/// [`clip_grad_norm`]; `composed_only` runs the non-CPU path on the CPU too (for tests).
fn clip<M, E, D>(
    grads: &mut Gradients<E, D>,
    model: &M,
    max_norm: f64,
    composed_only: bool,
) -> Result<f64, Error>
where
    M: TensorCollection<E, D>,
    E: Dtype,
    D: Device<E>,
    Error: From<D::Err>,
{
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Config(format!(
            "clip_grad_norm: max_norm must be positive, got {max_norm}"
        )));
    }
    let mut norm = SquaredNorm {
        grads,
        composed_only,
        cpu_sum: 0.0,
        total: None,
    };
    M::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut norm,
    })?;
    let squared = match norm.total {
        Some(t) => t.as_vec()[0].to_f64().unwrap_or(f64::NAN),
        None => norm.cpu_sum,
    };
    let total_norm = squared.sqrt();
    let coef = max_norm / (total_norm + 1e-6);
    if total_norm.is_finite() && coef < 1.0 {
        M::iter_tensors(&mut RecursiveWalker {
            m: model,
            f: &mut Scale {
                grads: norm.grads,
                composed_only,
                coef,
            },
        })?;
    }
    Ok(total_norm)
}

struct SquaredNorm<'a, E: Dtype, D: Storage<E>> {
    grads: &'a mut Gradients<E, D>,
    composed_only: bool,
    cpu_sum: f64,
    total: Option<Tensor<Rank0, E, D>>,
}

impl<E: Dtype, D: Device<E>> TensorVisitor<E, D> for SquaredNorm<'_, E, D> {
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
        let buf = self.grads.get_or_alloc_mut(p)?;
        if let Some(g) = buffers::cpu_slice::<E, D>(buf).filter(|_| !self.composed_only) {
            self.cpu_sum += g
                .iter()
                .map(|v| v.to_f64().map_or(f64::NAN, |v| v * v))
                .sum::<f64>();
            return Ok(None);
        }
        // Summed on the device, read once at the end.
        let s = self.grads.get(p).try_square()?.try_sum::<Rank0, _>()?;
        self.total = Some(match self.total.take() {
            Some(t) => t.try_add(s)?,
            None => s,
        });
        Ok(None)
    }
}

struct Scale<'a, E: Dtype, D: Storage<E>> {
    grads: &'a mut Gradients<E, D>,
    composed_only: bool,
    coef: f64,
}

impl<E: Dtype, D: Device<E>> TensorVisitor<E, D> for Scale<'_, E, D> {
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
        let buf = self.grads.get_or_alloc_mut(p)?;
        match buffers::cpu_slice::<E, D>(buf).filter(|_| !self.composed_only) {
            Some(g) => {
                let c = E::from_f64(self.coef).unwrap_or_default();
                g.iter_mut().for_each(|v| *v *= c);
            }
            None => {
                let buf = self.grads.get_or_alloc_mut(p)?;
                buffers::scale(p.device(), buf, *p.shape(), self.coef)?;
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{floats, reference, Model};
    use super::*;
    use dfdx::tensor::Cpu;

    fn check(composed_only: bool) {
        let r = reference();
        let dev = Cpu::default();
        let model: Model = super::super::testing::model(&dev);
        for case in r["clip"]["cases"].as_array().unwrap() {
            let mut grads = super::super::testing::grads(&model, model_alloc(&model));
            for (a, b) in grads
                .get(&model.weight)
                .as_vec()
                .iter()
                .zip(floats(&r["clip"]["grads"]["weight"]))
            {
                assert!(
                    (a - b).abs() < 1e-12,
                    "the gradients before clipping differ: {a} vs {b}"
                );
            }
            let max_norm = case["max_norm"].as_f64().unwrap();
            let norm = clip(&mut grads, &model, max_norm, composed_only).unwrap();
            let want = case["total_norm"].as_f64().unwrap();
            assert!((norm - want).abs() < 1e-12, "{norm} vs {want}");
            for (got, want) in [
                (grads.get(&model.weight).as_vec(), floats(&case["weight"])),
                (grads.get(&model.bias).as_vec(), floats(&case["bias"])),
            ] {
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-12, "{got:?} vs {want:?}");
                }
            }
        }
    }

    fn model_alloc(m: &Model) -> Gradients<f64, Cpu> {
        dfdx::nn::ZeroGrads::alloc_grads(m)
    }

    #[test]
    fn matches_torch_clip_grad_norm() {
        check(false);
    }

    #[test]
    fn device_path_matches_torch_clip_grad_norm() {
        check(true);
    }

    #[test]
    fn rejects_a_non_positive_max_norm_and_leaves_non_finite_norms_alone() {
        let dev = Cpu::default();
        let model: Model = super::super::testing::model(&dev);
        let mut grads = model_alloc(&model);
        let err = clip_grad_norm(&mut grads, &model, 0.0).unwrap_err();
        assert!(
            err.to_string().contains("max_norm must be positive"),
            "{err}"
        );
        let g = grads.get_or_alloc_mut(&model.bias).unwrap();
        buffers::cpu_slice::<f64, Cpu>(g).unwrap()[0] = f64::INFINITY;
        let norm = clip_grad_norm(&mut grads, &model, 1.0).unwrap();
        assert_eq!(norm, f64::INFINITY);
        assert_eq!(grads.get(&model.bias).as_vec()[0], f64::INFINITY);
    }
}
