//! Comparing a model with reference values written by PyTorch, in the manner of llm.c's
//! `test_gpt2.c`: the same weights, the same batch, and the logits, loss and gradients side by
//! side.
//!
//! A reference is a safetensors file of named tensors (any float type); the comparisons report
//! the first values of both sides and where the largest difference is, so a failure says what
//! went wrong without a debugger.

use crate::Error;
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorName, ViewTensorRef,
};
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Gradients, Tensor};
use dfdx::tensor_ops::Device;
use std::collections::BTreeMap;
use std::path::Path;

/// Named reference tensors, as `f64`.
#[derive(Debug, Clone, Default)]
pub struct Reference {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Reference {
    /// Reads every tensor of a safetensors file (F32, F64, F16, BF16 and I64, as `f64`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let fail = |e: String| {
            Error::Checkpoint(format!(
                "cannot read the reference {}: {e}; regenerate it with the script in \
                 tools/reference (see its README)",
                path.display()
            ))
        };
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fail(format!("{e:?}")))?;
        let mut tensors = BTreeMap::new();
        for (k, v) in st.tensors() {
            let d = v.data();
            let values: Vec<f64> = match v.dtype() {
                safetensors::Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f64)
                    .collect(),
                safetensors::Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f64)
                    .collect(),
                safetensors::Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect(),
                other => return Err(fail(format!("`{k}` has the unsupported type {other:?}"))),
            };
            tensors.insert(k, (v.shape().to_vec(), values));
        }
        Ok(Reference { tensors })
    }

    /// The tensor `key`: its shape and values.
    pub fn get(&self, key: &str) -> Result<(&[usize], &[f64]), Error> {
        self.tensors
            .get(key)
            .map(|(s, v)| (s.as_slice(), v.as_slice()))
            .ok_or_else(|| {
                Error::Checkpoint(format!(
                    "the reference has no tensor `{key}`; it has {:?}",
                    self.tensors.keys().take(12).collect::<Vec<_>>()
                ))
            })
    }

    /// The values of `key`, as `f64`.
    pub fn values(&self, key: &str) -> Result<&[f64], Error> {
        Ok(self.get(key)?.1)
    }

    /// The values of `key` as `usize` (token ids, labels).
    pub fn ids(&self, key: &str) -> Result<Vec<usize>, Error> {
        Ok(self.values(key)?.iter().map(|&v| v as usize).collect())
    }

    /// Every key, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

/// The largest difference between two tensors and where it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diff {
    /// `max |got - want|`.
    pub max_abs: f64,
    /// `max |got - want| / max |want|`: relative to the tensor's scale, so that entries near 0
    /// do not dominate (a gradient's tiny entries have tiny absolute errors).
    pub rel_to_max: f64,
    /// Index of the largest absolute difference.
    pub at: usize,
}

/// Compares `got` with `want`; a length mismatch is an error.
pub fn diff(got: &[f64], want: &[f64]) -> Result<Diff, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} values computed, {} in the reference",
            got.len(),
            want.len()
        ));
    }
    let mut d = Diff {
        max_abs: 0.0,
        rel_to_max: 0.0,
        at: 0,
    };
    let mut scale = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        // NaN counts as the largest difference.
        if e > d.max_abs || e.is_nan() {
            d.max_abs = if e.is_nan() { f64::INFINITY } else { e };
            d.at = i;
        }
        scale = scale.max(w.abs());
    }
    d.rel_to_max = d.max_abs / scale.max(1e-12);
    Ok(d)
}

fn head(v: &[f64]) -> String {
    let shown: Vec<String> = v.iter().take(5).map(|x| format!("{x:+.6e}")).collect();
    format!(
        "[{}{}]",
        shown.join(", "),
        if v.len() > 5 { ", ..." } else { "" }
    )
}

/// Checks `max |got - want| ≤ tol`; the message shows the first values and the worst entry.
pub fn check_abs(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<Diff, String> {
    let d = diff(got, want).map_err(|e| format!("{what}: {e}"))?;
    if d.max_abs <= tol {
        return Ok(d);
    }
    Err(format!(
        "{what}: max abs difference {:.3e} > {tol:.0e} at index {} (ours {:+.6e}, reference \
         {:+.6e})\n  ours:      {}\n  reference: {}",
        d.max_abs,
        d.at,
        got[d.at],
        want[d.at],
        head(got),
        head(want)
    ))
}

/// Checks `max |got - want| / max |want| ≤ tol` (see [`Diff::rel_to_max`]).
pub fn check_rel(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<Diff, String> {
    let d = diff(got, want).map_err(|e| format!("{what}: {e}"))?;
    if d.rel_to_max <= tol {
        return Ok(d);
    }
    Err(format!(
        "{what}: relative difference {:.3e} > {tol:.0e} (max abs {:.3e} at index {}: ours \
         {:+.6e}, reference {:+.6e})\n  ours:      {}\n  reference: {}",
        d.rel_to_max,
        d.max_abs,
        d.at,
        got[d.at],
        want[d.at],
        head(got),
        head(want)
    ))
}

/// The gradient of every trainable tensor of `model`, by checkpoint key, as `f64`.
///
/// `grads` must hold an entry for every parameter, as those from `model.alloc_grads()` do
/// (dfdx's `Gradients::get` panics on a tensor it has never seen).
pub fn grads_by_name<E, D, M>(model: &M, grads: &Gradients<E, D>) -> Vec<(String, Vec<f64>)>
where
    E: Dtype + num_traits::ToPrimitive,
    D: Device<E>,
    M: TensorCollection<E, D>,
{
    struct Collect<'g, E: Dtype, D: Device<E>>(&'g Gradients<E, D>, Vec<(String, Vec<f64>)>);
    impl<E: Dtype + num_traits::ToPrimitive, D: Device<E>> TensorVisitor<E, D> for Collect<'_, E, D> {
        type Viewer = (ViewTensorRef, ViewTensorName);
        type Err = std::convert::Infallible;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, E, D>,
            (t, name): (&Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, Self::Err> {
            if opts.do_gradient_update {
                let key = name.strip_suffix('.').map(str::to_string).unwrap_or(name);
                let g: Vec<f64> = self
                    .0
                    .get(t)
                    .as_vec()
                    .iter()
                    .map(|x| x.to_f64().unwrap_or(f64::NAN))
                    .collect();
                self.1.push((key, g));
            }
            Ok(None)
        }
    }
    let mut c = Collect(grads, Vec::new());
    let walked = M::iter_tensors(&mut RecursiveWalker {
        m: (model, String::new()),
        f: &mut c,
    });
    walked.unwrap_or_else(|e| match e {});
    c.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_show_values_and_the_worst_entry() {
        let e = check_abs("logits", &[1.0, 2.0, 3.5], &[1.0, 2.0, 3.0], 1e-4).unwrap_err();
        assert!(e.contains("max abs difference 5.000e-1"), "{e}");
        assert!(e.contains("at index 2"), "{e}");
        assert!(check_rel("g", &[1.0, 1e-9], &[1.0, 0.0], 1e-3).is_ok());
        assert!(check_abs("nan", &[f64::NAN], &[0.0], 1.0).is_err());
    }
}
