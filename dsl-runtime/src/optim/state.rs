//! An optimizer's state by parameter name, for exact resume, and its safetensors file.

use super::buffers;
use crate::Error;
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorName, ViewTensorRef,
};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::safetensors::SafeDtype;
use dfdx::tensor::{Gradients, Storage, Tensor};
use dfdx::tensor_ops::Device;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One state tensor of one parameter (a momentum buffer, a first moment, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct StateBuffer<E> {
    /// The parameter's shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: Vec<E>,
}

/// Everything an optimizer needs to continue exactly where it stopped: which optimizer, how
/// many steps it has taken (Adam's bias correction depends on it), and its per-parameter
/// buffers, keyed `"{parameter}.{buffer}"` with PyTorch's buffer names: `fc1.weight.exp_avg`,
/// `fc1.weight.exp_avg_sq` (Adam), `fc1.weight.momentum_buffer` (SGD with momentum),
/// `fc1.weight.exp_avg` (Lion). The parameter names are the model's checkpoint keys.
///
/// The hyper-parameters are not part of it (as in PyTorch, they are the program's): build the
/// optimizer with the same config, then [`Optim::load_state`](super::Optim::load_state). The
/// learning rate of a schedule is a function of [`step`](Self::step).
///
/// ```
/// use neural_arch::optim::{Adam, AdamConfig, Optim, OptimizerState};
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let mut model = dev.build_module::<Linear<3, 2>, f32>();
/// let mut opt = Adam::new(&model, AdamConfig::default());
/// let mut grads = model.alloc_grads();
/// let x: Tensor<Rank2<4, 3>, f32, _> = dev.sample_normal();
/// grads = model.forward(x.trace(grads)).square().mean().backward();
/// opt.step(&mut model, &mut grads).unwrap();
///
/// // Save next to the model's own safetensors file ...
/// let path = std::env::temp_dir().join(format!("doc-adam-{}.safetensors", std::process::id()));
/// opt.state(&model).unwrap().save_safetensors(&path).unwrap();
/// // ... and resume in a fresh optimizer.
/// let mut resumed = Adam::new(&model, AdamConfig::default());
/// resumed.load_state(&model, &OptimizerState::load_safetensors(&path).unwrap()).unwrap();
/// assert_eq!(resumed.steps(), 1);
/// # std::fs::remove_file(path).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState<E> {
    /// The optimizer's name (`"Sgd"`, `"Adam"`, `"Lion"`); loading into another one fails.
    pub optimizer: String,
    /// Steps taken.
    pub step: u64,
    /// The buffers by key.
    pub buffers: BTreeMap<String, StateBuffer<E>>,
}

impl<E: Dtype + SafeDtype> OptimizerState<E> {
    /// Writes the buffers as safetensors tensors and `optimizer` and `step` as metadata.
    pub fn save_safetensors<P: AsRef<Path>>(&self, path: P) -> Result<(), Error> {
        let path = path.as_ref();
        let bytes: Vec<(&String, Vec<u8>)> = self
            .buffers
            .iter()
            .map(|(k, b)| (k, b.values.iter().flat_map(|v| v.to_le_bytes()).collect()))
            .collect();
        let views = bytes
            .iter()
            .zip(self.buffers.values())
            .map(|((k, data), b)| {
                safetensors::tensor::TensorView::new(E::safe_dtype(), b.shape.clone(), data)
                    .map(|v| (k.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| checkpoint_error(path, e))?;
        let meta = HashMap::from([
            ("optimizer".to_string(), self.optimizer.clone()),
            ("step".to_string(), self.step.to_string()),
        ]);
        safetensors::tensor::serialize_to_file(views, &Some(meta), path)
            .map_err(|e| checkpoint_error(path, e))
    }

    /// Reads a file written by [`save_safetensors`](Self::save_safetensors).
    pub fn load_safetensors<P: AsRef<Path>>(path: P) -> Result<Self, Error> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| checkpoint_error(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| checkpoint_error(path, e))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let field = |name: &str| {
            meta.get(name).cloned().ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: no `{name}` in the metadata; is this an optimizer state written by \
                     OptimizerState::save_safetensors?",
                    path.display()
                ))
            })
        };
        let optimizer = field("optimizer")?;
        let step = field("step")?.parse().map_err(|e| {
            Error::Checkpoint(format!("{}: `step` is not a number: {e}", path.display()))
        })?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| checkpoint_error(path, e))?;
        let mut buffers = BTreeMap::new();
        for (key, view) in st.tensors() {
            if view.dtype() != E::safe_dtype() {
                return Err(Error::Checkpoint(format!(
                    "{}: `{key}` is {:?}, but the optimizer's element type is {:?}",
                    path.display(),
                    view.dtype(),
                    E::safe_dtype()
                )));
            }
            let width = std::mem::size_of::<E>();
            let data = view.data();
            let values = (0..data.len() / width)
                .map(|i| E::from_le_bytes(data, i * width))
                .collect();
            let shape = view.shape().to_vec();
            buffers.insert(key, StateBuffer { shape, values });
        }
        Ok(Self {
            optimizer,
            step,
            buffers,
        })
    }
}

fn checkpoint_error(path: &Path, e: impl std::fmt::Debug) -> Error {
    Error::Checkpoint(format!("{}: {e:?}", path.display()))
}

/// Collects the named buffers of every trainable parameter of `model`.
pub(crate) fn export<M: TensorCollection<E, D>, E: Dtype, D: Device<E>>(
    model: &M,
    buffers: &mut [(&str, &mut Gradients<E, D>)],
) -> Result<BTreeMap<String, StateBuffer<E>>, D::Err> {
    struct Export<'a, 's, 'g, E, D: Storage<E>> {
        buffers: &'a mut [(&'s str, &'g mut Gradients<E, D>)],
        out: BTreeMap<String, StateBuffer<E>>,
    }
    impl<E: Dtype, D: Device<E>> TensorVisitor<E, D> for Export<'_, '_, '_, E, D> {
        type Viewer = (ViewTensorRef, ViewTensorName);
        type Err = D::Err;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, E, D>,
            (p, name): (&Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
            if opts.do_gradient_update {
                for (buf_name, state) in self.buffers.iter_mut() {
                    // A parameter that has not been stepped yet has all-zero state.
                    state.try_alloc_for(p)?;
                    let values = state.get(p).as_vec();
                    let shape = p.shape().concrete().into_iter().collect();
                    self.out
                        .insert(format!("{name}.{buf_name}"), StateBuffer { shape, values });
                }
            }
            Ok(None)
        }
    }
    let mut visitor = Export {
        buffers,
        out: BTreeMap::new(),
    };
    M::iter_tensors(&mut RecursiveWalker {
        m: (model, String::new()),
        f: &mut visitor,
    })?;
    Ok(visitor.out)
}

/// The shape of every trainable parameter of `model`, by name.
fn parameter_shapes<M: TensorCollection<E, D>, E: Dtype, D: Device<E>>(
    model: &M,
) -> Result<Vec<(String, Vec<usize>)>, D::Err> {
    struct Shapes(Vec<(String, Vec<usize>)>);
    impl<E: Dtype, D: Device<E>> TensorVisitor<E, D> for Shapes {
        type Viewer = (ViewTensorRef, ViewTensorName);
        type Err = D::Err;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, E, D>,
            (p, name): (&Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
            if opts.do_gradient_update {
                self.0
                    .push((name, p.shape().concrete().into_iter().collect()));
            }
            Ok(None)
        }
    }
    let mut shapes = Shapes(Vec::new());
    M::iter_tensors(&mut RecursiveWalker {
        m: (model, String::new()),
        f: &mut shapes,
    })?;
    Ok(shapes.0)
}

/// Writes the named buffers of every trainable parameter of `model` from `state`, after
/// checking that `state` has exactly the keys and shapes the model needs (so that a failed load
/// leaves the optimizer as it was).
pub(crate) fn import<M: TensorCollection<E, D>, E: Dtype, D: Device<E>>(
    model: &M,
    buffers: &mut [(&str, &mut Gradients<E, D>)],
    optimizer: &str,
    state: &OptimizerState<E>,
) -> Result<(), Error>
where
    Error: From<D::Err>,
{
    if state.optimizer != optimizer {
        return Err(Error::Checkpoint(format!(
            "the state is {}'s, but it is being loaded into {optimizer}",
            state.optimizer
        )));
    }
    let mut expected = std::collections::BTreeSet::new();
    for (name, shape) in parameter_shapes(model)? {
        for (buf_name, _) in buffers.iter() {
            let key = format!("{name}.{buf_name}");
            let Some(b) = state.buffers.get(&key) else {
                return Err(Error::Checkpoint(format!(
                    "the optimizer state has no `{key}`; was it saved from this model?"
                )));
            };
            let numel: usize = shape.iter().product();
            if b.shape != shape || b.values.len() != numel {
                return Err(Error::Checkpoint(format!(
                    "optimizer state `{key}` has shape {:?} ({} values), but the parameter is \
                     {shape:?}",
                    b.shape,
                    b.values.len()
                )));
            }
            expected.insert(key);
        }
    }
    let extra: Vec<&String> = state
        .buffers
        .keys()
        .filter(|k| !expected.contains(*k))
        .collect();
    if !extra.is_empty() {
        return Err(Error::Checkpoint(format!(
            "the optimizer state has buffers for parameters this model does not have: {extra:?}"
        )));
    }

    struct Import<'a, 's, 'g, E, D: Storage<E>> {
        buffers: &'a mut [(&'s str, &'g mut Gradients<E, D>)],
        state: &'a OptimizerState<E>,
    }
    impl<E: Dtype, D: Device<E>> TensorVisitor<E, D> for Import<'_, '_, '_, E, D> {
        type Viewer = (ViewTensorRef, ViewTensorName);
        type Err = D::Err;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, E, D>,
            (p, name): (&Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
            if opts.do_gradient_update {
                for (buf_name, grads) in self.buffers.iter_mut() {
                    let values = self.state.buffers[&format!("{name}.{buf_name}")]
                        .values
                        .clone();
                    let src = p.device().try_tensor_from_vec(values, *p.shape())?;
                    buffers::overwrite(grads.get_or_alloc_mut(p)?, src)?;
                }
            }
            Ok(None)
        }
    }
    M::iter_tensors(&mut RecursiveWalker {
        m: (model, String::new()),
        f: &mut Import { buffers, state },
    })?;
    Ok(())
}
