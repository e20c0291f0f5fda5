//! Embeddings: token ids to vectors (a lookup table) and learned absolute positions.

use super::cpu_fast::{cpu_tensor, cpu_vec, fused_cpu, CPU};
use super::LayerInfo;
use crate::{Elem, Error};
use dfdx::nn::{
    BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection, TensorOptions,
};
use dfdx::shapes::{Const, Dim, Dtype, HasShape, Rank2, Shape};
use dfdx::tensor::{HasErr, PutTape, SplitTape, Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, Device, GatherTo, ReshapeTo, TryAdd};
use rand_distr::{Distribution, StandardNormal};

/// `y[..., :] = weight[id, :]`: token ids to vectors, `usize[*] -> [*, D]`.
///
/// # Shapes
/// `usize[T] -> [T, D]` and `usize[B, T] -> [B, T, D]`, with `B` and `T` fixed or runtime sizes.
///
/// Parameter `weight` `[V, D]`, initialised from N(0, 1) as in PyTorch. The gradient tape rides
/// on the id tensor, as in dfdx (`ids.trace(grads)`); the ids themselves have no gradient, and
/// the gradient of a row is the sum over every position that looked it up.
///
/// An id `≥ V` is [`Error::TokenOutOfRange`] (with its position in the flattened input), checked
/// before the lookup. On a GPU this copies the ids to the host, which is small next to the
/// `[B, T, D]` output.
///
/// On the CPU the lookup and its gradient are row copies and row sums (a fused path); other
/// devices use dfdx's `gather`.
///
/// PyTorch: `torch.nn.Embedding(V, D)` (GPT-2's `wte`, BERT's `word_embeddings`).
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let mut wte = dev.build_module::<Embedding<3, 2>, f32>();
/// wte.weight = dev.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]);
/// let y = wte.forward(dev.tensor([[2usize, 0, 2]]));
/// assert_eq!(y.array(), [[[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]]);
/// assert!(wte.try_forward(dev.tensor([3usize])).is_err());
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Embedding<const V: usize, const D: usize>;

/// The built [`Embedding`].
#[derive(Debug, Clone)]
pub struct EmbeddingModule<const V: usize, const M: usize, E: Dtype, D: Storage<E>> {
    /// One row per token id, N(0, 1) at initialisation.
    pub weight: Tensor<Rank2<V, M>, E, D>,
}

impl<const V: usize, const M: usize> LayerInfo for Embedding<V, M> {
    const PARAMS: usize = V * M;
}

impl<const V: usize, const M: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E>
    for Embedding<V, M>
{
    type Built = EmbeddingModule<V, M, E, D>;
}

impl<const V: usize, const M: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for EmbeddingModule<V, M, E, D>
{
}

/// Fills `t` from N(0, std²). rand_distr's `Normal` samples only `f32` and `f64`; sampling in
/// `f64` and converting serves every element type, `f16` included.
pub(crate) fn fill_normal<S: Shape, E: Elem, D: Device<E>>(
    t: &mut Tensor<S, E, D>,
    std: f64,
) -> Result<(), D::Err> {
    t.try_fill_with_distr(StandardNormal.map(move |z: f64| E::from_f64(z * std).unwrap()))
}

impl<const V: usize, const M: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for EmbeddingModule<V, M, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = EmbeddingModule<V, M, E2, D2>;

    fn iter_tensors<W: ModuleVisitor<Self, E, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            Self::tensor(
                "weight",
                |s| &s.weight,
                |s| &mut s.weight,
                TensorOptions::reset_with(|t| fill_normal(t, 1.0)),
            ),
            |weight| EmbeddingModule { weight },
        )
    }
}

/// The first id `≥ vocab`, as the error the forward pass returns.
fn check_ids(ids: &[usize], vocab: usize) -> Result<(), Error> {
    match ids.iter().position(|&id| id >= vocab) {
        Some(position) => Err(Error::TokenOutOfRange {
            id: ids[position],
            position,
            vocab,
        }),
        None => Ok(()),
    }
}

macro_rules! embedding_rank {
    ([$($d:ident $i:tt),+]) => {
        impl<const V: usize, const M: usize, $($d: Dim,)+ E: Dtype, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)+), usize, D, T>> for EmbeddingModule<V, M, E, D>
        where
            Error: From<<D as HasErr>::Err>,
        {
            type Output = Tensor<($($d,)+ Const<M>), E, D, T>;
            type Error = Error;

            fn try_forward(
                &self,
                ids: Tensor<($($d,)+), usize, D, T>,
            ) -> Result<Self::Output, Error> {
                let shape = *ids.shape();
                let (ids, tape) = ids.split_tape();
                let id_values = ids.as_vec();
                // dfdx's gather indexes without a check (a panic on the CPU, garbage on a GPU).
                check_ids(&id_values, V)?;
                if M > 0 && fused_cpu::<E, D>() {
                    let out_shape = ($(shape.$i,)+ Const::<M>);
                    return Ok(embed_cpu(&self.weight, id_values, out_shape, tape)?);
                }
                Ok(self.weight.clone().put_tape(tape).try_gather(ids)?)
            }
        }
    };
}
embedding_rank!([S 0]);
embedding_rank!([B 0, S 1]);

impl<const V: usize, const M: usize, E: Dtype, D: Device<E>> EmbeddingModule<V, M, E, D> {
    /// The tied output projection: `logits = h · weightᵀ`, `[B, S, M] -> [B, S, V]`.
    ///
    /// GPT-2 (and the original Transformer) reuse the input embedding as the output layer
    /// (Press & Wolf, <https://arxiv.org/abs/1608.05859>); the gradient of both uses reaches
    /// `weight`. In a `model!` forward: `wte.unembed(h)`.
    ///
    /// PyTorch: `h @ wte.weight.T` (Hugging Face's `lm_head` tied to `wte`).
    #[allow(clippy::type_complexity, reason = "the shapes are the documentation")]
    pub fn unembed<B: Dim, S: Dim, T: Tape<E, D>>(
        &self,
        h: Tensor<(B, S, Const<M>), E, D, T>,
    ) -> Result<Tensor<(B, S, Const<V>), E, D, T>, D::Err> {
        let (b, s, m) = *h.shape();
        let h = h.try_reshape_like(&(b.size() * s.size(), m))?;
        super::linear(h, &self.weight, None)?.try_reshape_like(&(b, s, Const))
    }
}

/// The lookup on the CPU: row copies, and a row scatter-add for the gradient. dfdx's CPU
/// gather walks an n-d index per element: measured on `Embedding<4096, 256>` with `[8, 128]` ids
/// in f32 on one core, forward 0.15 ms instead of 0.39 ms, forward and backward 0.38 ms instead
/// of 1.02 ms (PyTorch: 0.03 ms and 0.20 ms).
fn embed_cpu<const V: usize, const M: usize, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    weight: &Tensor<Rank2<V, M>, E, D>,
    ids: Vec<usize>,
    shape: S,
    tape: T,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    // Free for a contiguous weight; a strided view someone assigned is copied, on the tape.
    let (w, w_tape) = weight
        .retaped::<T>()
        .try_reshape_like(&(V * M,))?
        .split_tape();
    let mut tape = tape.merge(w_tape);
    // Read in place by index: copying the table out would cost `V·M` per call.
    let table = cpu_tensor(&w).expect(CPU);
    let mut out = Vec::with_capacity(ids.len() * M);
    for &id in &ids {
        out.extend((id * M..(id + 1) * M).map(|k| table[[k]]));
    }
    let out = w.device().try_tensor_from_vec(out, shape)?;
    if T::OWNS_TAPE {
        let (w, out_ghost) = (w.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            // Two buffers at once, and the API lends one at a time: take the output's gradient
            // out of its slot and put it back afterwards.
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            let g_w = cpu_vec::<E, D>(grads.get_or_alloc_mut(&w)?).expect(CPU);
            for (&id, g) in ids.iter().zip(g_out.chunks_exact(M)) {
                for (a, &b) in g_w[id * M..(id + 1) * M].iter_mut().zip(g) {
                    *a += b;
                }
            }
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// `y = x + weight[0..T]`: learned absolute positions added to a sequence, broadcast over the
/// batch (GPT-2's `wpe`, BERT's and ViT's position embeddings).
///
/// # Shapes
/// `[B, T, D] -> [B, T, D]` and `[T, D] -> [T, D]`, with `T ≤ MAX` (a runtime `T` is checked when
/// the layer runs: `T > MAX` is an [`Error::Shape`] naming `MAX`).
///
/// Parameter `weight` `[MAX, D]`, initialised from N(0, 0.02²): the Hugging Face default
/// (`initializer_range = 0.02` for GPT-2, BERT and ViT) and nanoGPT's. OpenAI's original GPT-2
/// code drew `wpe` with std 0.01; set the weight after building if you need that.
///
/// PyTorch: `x + nn.Embedding(MAX, D)(torch.arange(T))`, as GPT-2 writes it
/// (`nn.Parameter(torch.zeros(1, MAX, D))` sliced to `T` is the same in ViT).
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let mut wpe = dev.build_module::<PositionalEmbedding<4, 2>, f32>();
/// wpe.weight = dev.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]);
/// let x: Tensor<(Const<1>, usize, Const<2>), f32, _> = dev.zeros_like(&(Const, 3, Const));
/// assert_eq!(wpe.forward(x).as_vec(), [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
/// let too_long: Tensor<(usize, Const<2>), f32, _> = dev.zeros_like(&(5, Const));
/// assert!(wpe.try_forward(too_long).is_err());
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PositionalEmbedding<const MAX: usize, const D: usize>;

/// The built [`PositionalEmbedding`].
#[derive(Debug, Clone)]
pub struct PositionalEmbeddingModule<const MAX: usize, const M: usize, E: Dtype, D: Storage<E>> {
    /// One row per position, N(0, 0.02²) at initialisation.
    pub weight: Tensor<Rank2<MAX, M>, E, D>,
}

impl<const MAX: usize, const M: usize> LayerInfo for PositionalEmbedding<MAX, M> {
    const PARAMS: usize = MAX * M;
}

impl<const MAX: usize, const M: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E>
    for PositionalEmbedding<MAX, M>
{
    type Built = PositionalEmbeddingModule<MAX, M, E, D>;
}

impl<const MAX: usize, const M: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for PositionalEmbeddingModule<MAX, M, E, D>
{
}

impl<const MAX: usize, const M: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for PositionalEmbeddingModule<MAX, M, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = PositionalEmbeddingModule<MAX, M, E2, D2>;

    fn iter_tensors<W: ModuleVisitor<Self, E, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            Self::tensor(
                "weight",
                |s| &s.weight,
                |s| &mut s.weight,
                TensorOptions::reset_with(|t| fill_normal(t, 0.02)),
            ),
            |weight| PositionalEmbeddingModule { weight },
        )
    }
}

impl<const MAX: usize, const M: usize, E: Dtype, D: Device<E>>
    PositionalEmbeddingModule<MAX, M, E, D>
{
    /// `weight[0..t]` as a `[t, M]` tensor on tape `T`, or why it cannot be.
    fn rows<S: Dim, T: Tape<E, D>>(&self, t: S) -> Result<Tensor<(S, Const<M>), E, D, T>, Error>
    where
        Error: From<<D as HasErr>::Err>,
    {
        let n = t.size();
        if n > MAX {
            return Err(Error::Shape(format!(
                "PositionalEmbedding<{MAX}, {M}> holds {MAX} positions (MAX), but was given a \
                 sequence of {n}; shorten the input to at most {MAX} or declare a larger MAX"
            )));
        }
        let w = self.weight.retaped::<T>();
        // Reshaping a contiguous tensor only renames its shape; the slice copies `n` rows.
        Ok(if n == MAX {
            w.try_reshape_like(&(t, Const))?
        } else {
            w.try_slice((0..n, ..))?.try_reshape_like(&(t, Const))?
        })
    }
}

impl<const MAX: usize, const M: usize, S: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(S, Const<M>), E, D, T>> for PositionalEmbeddingModule<MAX, M, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(S, Const<M>), E, D, T>;
    type Error = Error;

    fn try_forward(&self, x: Tensor<(S, Const<M>), E, D, T>) -> Result<Self::Output, Error> {
        let pos = self.rows::<S, T>(x.shape().0)?;
        Ok(x.try_add(pos)?)
    }
}

impl<const MAX: usize, const M: usize, B: Dim, S: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, S, Const<M>), E, D, T>> for PositionalEmbeddingModule<MAX, M, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, S, Const<M>), E, D, T>;
    type Error = Error;

    fn try_forward(&self, x: Tensor<(B, S, Const<M>), E, D, T>) -> Result<Self::Output, Error> {
        let shape = *x.shape();
        let pos = self.rows::<S, T>(shape.1)?.try_broadcast_like(&shape)?;
        Ok(x.try_add(pos)?)
    }
}

#[cfg(test)]
pub(super) mod reference {
    //! The cases written by `tools/reference/embeddings_norms.py`, shared by the tests of
    //! `embedding.rs`, `rms_norm.rs` and `batch_norm.rs`.

    use serde_json::Value;

    /// The case called `name`.
    pub fn case(name: &str) -> Value {
        let file: Value =
            serde_json::from_str(include_str!("../../tests/reference/embeddings_norms.json"))
                .expect("embeddings_norms.json parses");
        file["cases"]
            .as_array()
            .expect("a list of cases")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no case {name} in embeddings_norms.json"))
            .clone()
    }

    /// The numbers under `key`.
    pub fn floats(v: &Value, key: &str) -> Vec<f64> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("no list {key}"))
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect()
    }

    /// The whole numbers under `key` (ids, shapes).
    pub fn ints(v: &Value, key: &str) -> Vec<usize> {
        floats(v, key).into_iter().map(|x| x as usize).collect()
    }

    /// Fails with the first values when `ours` and `torch` differ by more than `tol`.
    pub fn assert_close(what: &str, ours: &[f64], torch: &[f64], tol: f64) {
        assert_eq!(ours.len(), torch.len(), "{what}: lengths differ");
        let d = ours
            .iter()
            .zip(torch)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            d <= tol,
            "{what}: max |ours - PyTorch| = {d:.3e} > {tol:.0e}\n ours: {:?}\n torch: {:?}",
            &ours[..ours.len().min(8)],
            &torch[..torch.len().min(8)]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu_fast::both_paths;
    use super::reference::{assert_close, case, floats, ints};
    use crate::gradcheck::{check_input_grads, check_param_grads, named_values};
    use crate::prelude::*;
    use crate::Error;

    type Dev = Cpu;

    #[test]
    fn embedding_matches_pytorch_with_repeated_ids() {
        let c = case("embedding");
        let dev = Dev::default();
        let mut wte = dev.build_module::<Embedding<5, 3>, f64>();
        wte.weight.copy_from(&floats(&c, "weight"));
        both_paths(|path| {
            let ids = dev.tensor_from_vec(ints(&c, "ids"), (2usize, 3usize));
            let y = wte.forward(ids.trace(wte.alloc_grads()));
            assert_eq!(y.shape().concrete().to_vec(), ints(&c, "y_shape"));
            assert_close(
                &format!("{path}: forward"),
                &y.as_vec(),
                &floats(&c, "y"),
                0.0,
            );
            let g = dev.tensor_from_vec(floats(&c, "g"), *y.shape());
            let grads = (y * g).sum::<Rank0, _>().backward();
            assert_close(
                &format!("{path}: grad weight"),
                &grads.get(&wte.weight).as_vec(),
                &floats(&c, "grad_weight"),
                1e-12,
            );

            // One sequence without a batch: the rows of the first example.
            let one: Tensor<Rank1<3>, usize, Dev> = dev.tensor([1, 4, 1]);
            let y: Tensor<Rank2<3, 3>, f64, Dev> = wte.forward(one);
            assert_close(
                &format!("{path}: forward [T]"),
                &y.as_vec(),
                &floats(&c, "y")[..9],
                0.0,
            );
        });
    }

    #[test]
    fn embedding_gradients_match_central_differences() {
        let dev = Dev::seed_from_u64(1);
        let mut wte = dev.build_module::<Embedding<4, 3>, f64>();
        // Ids 2 and 0 repeat, id 3 is never looked up (its gradient must be zero).
        let ids: Tensor<Rank2<2, 3>, usize, Dev> = dev.tensor([[2, 0, 2], [1, 2, 0]]);
        both_paths(|path| {
            let report = check_param_grads(&mut wte, |m, grads| {
                let y = m.forward(ids.trace(grads));
                (y.with_empty_tape().square() + y.tanh()).sum::<Rank0, _>()
            });
            assert_eq!(report.checked, Embedding::<4, 3>::PARAMS);
            assert!(report.max_abs_err <= 1e-6, "{path}: {report}");
            eprintln!("Embedding weight, {path}: {report}");
        });
    }

    #[test]
    fn a_strided_weight_is_read_and_differentiated_as_its_values() {
        // A weight assigned from a transposed view: the fast path must not read its raw buffer.
        let dev = Dev::seed_from_u64(9);
        let mut wte = dev.build_module::<Embedding<4, 3>, f64>();
        let base: Tensor<Rank2<3, 4>, f64, Dev> = dev.sample_normal();
        wte.weight = base.clone().permute();
        let ids: Tensor<Rank1<5>, usize, Dev> = dev.tensor([3, 0, 3, 1, 2]);
        let mut results = Vec::new();
        both_paths(|_| {
            let y = wte.forward(ids.leaky_trace());
            let w = dev.tensor_from_vec(
                (0..15).map(|i| i as f64).collect(),
                (Const::<5>, Const::<3>),
            );
            let values = y.as_vec();
            let grads = (y * w).sum::<Rank0, _>().backward();
            results.push((values, grads.get(&base).as_vec()));
        });
        let rows = base.array();
        let want: Vec<f64> = [3, 0, 3, 1, 2]
            .iter()
            .flat_map(|&id| (0..3).map(move |j| rows[j][id]))
            .collect();
        assert_eq!(results[0].0, want);
        assert!(
            results[0].1.iter().any(|g| *g != 0.0),
            "the gradient reaches the weight"
        );
        assert_eq!(results[0], results[1]);
    }

    #[test]
    fn embedding_rejects_ids_beyond_the_vocabulary() {
        let dev = Dev::default();
        let wte = dev.build_module::<Embedding<5, 3>, f64>();
        let ids: Tensor<(usize, usize), usize, Dev> =
            dev.tensor_from_vec(vec![1, 4, 0, 2, 7, 9], (2, 3));
        let err = wte.try_forward(ids).map(|_| ()).unwrap_err();
        assert_eq!(
            err,
            Error::TokenOutOfRange {
                id: 7,
                position: 4,
                vocab: 5
            }
        );
        assert!(err.to_string().contains("valid ids are 0..5"), "{err}");
        let err = wte
            .try_forward(dev.tensor([5usize]))
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::TokenOutOfRange {
                    id: 5,
                    position: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn params_and_names_are_pytorch_s() {
        let dev = Dev::default();
        let wte = dev.build_module::<Embedding<5, 3>, f32>();
        assert_eq!(Embedding::<5, 3>::PARAMS, wte.num_trainable_params());
        let wpe = dev.build_module::<PositionalEmbedding<7, 3>, f32>();
        assert_eq!(
            PositionalEmbedding::<7, 3>::PARAMS,
            wpe.num_trainable_params()
        );
        let mut wte = wte.to_dtype::<f64>();
        let mut wpe = wpe.to_dtype::<f64>();
        let names = |v: Vec<(String, Vec<f64>)>| v.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(named_values(&mut wte)), ["weight"]);
        assert_eq!(names(named_values(&mut wpe)), ["weight"]);
    }

    /// Mean and standard deviation of `v`.
    fn moments(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn initialisation_is_normal_with_the_documented_spread() {
        let dev = Dev::seed_from_u64(0);
        // 20 000 draws: the sample mean and std are within 0.03 of the truth with margin.
        let wte = dev.build_module::<Embedding<1000, 20>, f64>();
        let (mean, std) = moments(&wte.weight.as_vec());
        assert!(
            mean.abs() < 0.03 && (std - 1.0).abs() < 0.03,
            "{mean} {std}"
        );
        let wpe = dev.build_module::<PositionalEmbedding<1000, 20>, f64>();
        let (mean, std) = moments(&wpe.weight.as_vec());
        assert!(
            mean.abs() < 0.03 * 0.02 && (std - 0.02).abs() < 0.03 * 0.02,
            "{mean} {std}"
        );
        // Every element type samples (rand_distr's Normal alone has no f16).
        let half = dev.build_module::<Embedding<10, 10>, dfdx::dtypes::f16>();
        assert!(half.weight.as_vec().iter().any(|v| v.to_f32() != 0.0));
    }

    #[test]
    fn positional_embedding_matches_pytorch() {
        let c = case("positional_embedding");
        let dev = Dev::default();
        let mut wpe = dev.build_module::<PositionalEmbedding<4, 3>, f64>();
        wpe.weight.copy_from(&floats(&c, "weight"));
        let x = dev.tensor_from_vec(floats(&c, "x"), (2usize, 3usize, Const::<3>));
        let y = wpe.forward(x.leaky_trace());
        assert_close("forward", &y.as_vec(), &floats(&c, "y"), 1e-15);
        let g = dev.tensor_from_vec(floats(&c, "g"), *y.shape());
        let grads = (y * g).sum::<Rank0, _>().backward();
        assert_close(
            "grad x",
            &grads.get(&x).as_vec(),
            &floats(&c, "grad_x"),
            1e-15,
        );
        assert_close(
            "grad weight",
            &grads.get(&wpe.weight).as_vec(),
            &floats(&c, "grad_weight"),
            1e-12,
        );

        // Without a batch: the first example.
        let x0 = dev.tensor_from_vec(floats(&c, "x")[..9].to_vec(), (3usize, Const::<3>));
        assert_close(
            "forward [T, D]",
            &wpe.forward(x0).as_vec(),
            &floats(&c, "y")[..9],
            1e-15,
        );
    }

    #[test]
    fn positional_embedding_uses_all_rows_at_max_and_rejects_longer_inputs() {
        let dev = Dev::default();
        let mut wpe = dev.build_module::<PositionalEmbedding<3, 2>, f64>();
        wpe.weight = dev.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]);
        let x: Tensor<Rank3<2, 3, 2>, f64, Dev> = dev.zeros();
        let want = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(
            wpe.forward(x).array(),
            [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]; 2]
        );
        let x: Tensor<(usize, Const<2>), f64, Dev> = dev.zeros_like(&(3, Const));
        assert_eq!(wpe.forward(x).as_vec(), want);

        let long: Tensor<(Const<1>, usize, Const<2>), f64, Dev> =
            dev.zeros_like(&(Const, 4, Const));
        let err = wpe.try_forward(long).map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("PositionalEmbedding<3, 2> holds 3 positions (MAX)"),
            "{msg}"
        );
        assert!(msg.contains("sequence of 4"), "{msg}");
    }

    #[test]
    fn positional_embedding_gradients_match_central_differences() {
        let dev = Dev::seed_from_u64(2);
        let mut wpe = dev.build_module::<PositionalEmbedding<4, 3>, f64>();
        let x: Tensor<(Const<2>, usize, Const<3>), f64, Dev> =
            dev.sample_normal_like(&(Const, 3, Const));
        let report = check_param_grads(&mut wpe, |m, grads| {
            let y = m.forward(x.trace(grads));
            (y.with_empty_tape().square() + y.tanh()).sum::<Rank0, _>()
        });
        assert_eq!(report.checked, PositionalEmbedding::<4, 3>::PARAMS);
        assert!(report.max_abs_err <= 1e-6, "{report}");
        eprintln!("PositionalEmbedding weight: {report}");
        let report = check_input_grads(&x, |x| wpe.forward(x).tanh().sum::<Rank0, _>());
        assert!(report.max_abs_err <= 1e-6, "{report}");
        eprintln!("PositionalEmbedding input: {report}");
    }
}
