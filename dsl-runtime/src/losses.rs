//! Loss functions: scalar tensors whose `backward()` gives the gradients to train on.
//!
//! Each works with any tape (inference or training) and element type, on any device, is
//! computed from dfdx ops (so it back-propagates to every tensor input), and returns
//! [`Error`] for input that does not fit instead of panicking. [`cross_entropy`] has a fused
//! kernel for `f32`, `f64`, `f16` and `bf16` (the half types computed in `f32`) on the CPU,
//! which the tests check against the composition.
//!
//! | here | PyTorch |
//! | --- | --- |
//! | [`cross_entropy`] | `F.cross_entropy(logits.view(-1, C), targets.view(-1), ignore_index=, label_smoothing=)` |
//! | [`mse`] | `F.mse_loss(pred, target)` |
//! | [`bce_with_logits`] | `F.binary_cross_entropy_with_logits(logits, targets)` |
//! | [`clip_loss`] | CLIP's symmetric InfoNCE (<https://arxiv.org/abs/2103.00020>, Figure 3) |

use crate::layers::cpu_fast::{
    as_f, cpu_vec, fused_stored, max8, par_rows, read, stored_call, sum8, Stored, CPU,
};
use crate::layers::{LogitScaleModule, Real};
use crate::{Elem, Error};
use dfdx::shapes::{Axes2, Axis, Const, Dim, Dtype, HasShape, Rank0, Shape};
use dfdx::tensor::{HasErr, Merge, PutTape, SplitTape, Storage, Tape, Tensor, WithEmptyTape};
use dfdx::tensor_ops::{
    BroadcastTo, Device, MeanTo, PermuteTo, ReshapeTo, SelectTo, SumTo, TryAdd, TryDiv, TryMatMul,
    TryMul, TrySub,
};

/// `(rows, C)` logits or `(N, K)` embeddings.
type Matrix<N, const C: usize, E, D, T> = Tensor<(N, Const<C>), E, D, T>;

/// Options of [`cross_entropy`], PyTorch's names and defaults: no ignored target, no smoothing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CrossEntropy {
    /// Targets equal to it count neither in the loss nor in the mean (a padding token id, or a
    /// value outside `0..C` such as `usize::MAX`, the counterpart of PyTorch's `-100`).
    pub ignore_index: Option<usize>,
    /// `ε` in `[0, 1]`: the target distribution is `(1 − ε)·one_hot + ε / C` (Inception v3,
    /// <https://arxiv.org/abs/1512.00567>).
    pub label_smoothing: f64,
}

/// Logits whose last dimension is the `C` classes, seen as rows `(rows, C)`: `(N, C)`, and a
/// language model's `(B, T, C)` flattened row-major to `(B·T, C)`.
pub trait ClassLogits<const C: usize, E: Dtype, D: Storage<E>, T>: HasErr {
    /// The logits as `(rows, C)` (no copy when they are contiguous).
    fn try_into_rows(self) -> Result<Matrix<usize, C, E, D, T>, Self::Err>;
}

impl<N: Dim, const C: usize, E: Dtype, D: Device<E>, T: Tape<E, D>> ClassLogits<C, E, D, T>
    for Tensor<(N, Const<C>), E, D, T>
{
    fn try_into_rows(self) -> Result<Tensor<(usize, Const<C>), E, D, T>, D::Err> {
        let rows = self.shape().0.size();
        self.try_reshape_like(&(rows, Const))
    }
}

impl<B: Dim, S: Dim, const C: usize, E: Dtype, D: Device<E>, T: Tape<E, D>> ClassLogits<C, E, D, T>
    for Tensor<(B, S, Const<C>), E, D, T>
{
    fn try_into_rows(self) -> Result<Tensor<(usize, Const<C>), E, D, T>, D::Err> {
        let (b, s, _) = *self.shape();
        self.try_reshape_like(&(b.size() * s.size(), Const))
    }
}

/// The mean cross-entropy between `logits` and class `targets`, computed from `log_softmax`
/// (stable for any logits):
///
/// ```text
/// ℓᵢ = −(1 − ε)·log pᵢ[yᵢ] − (ε / C)·Σ_c log pᵢ[c],   p = softmax(logitsᵢ)
/// loss = Σ_{i: yᵢ ≠ ignore} ℓᵢ / |{i: yᵢ ≠ ignore}|
/// ```
///
/// # Shapes
/// `logits` `[N, C]` or `[B, T, C]`; `targets` one class per row (`N`, or `B·T` row-major);
/// the loss is a scalar.
///
/// Errors: a target `≥ C` that is not the ignore index ([`Error::TargetOutOfRange`]), a
/// number of targets other than the number of rows ([`Error::Shape`]), `label_smoothing`
/// outside `[0, 1]` ([`Error::Config`]). When every target is ignored the loss is 0 with zero
/// gradients, where PyTorch gives NaN, which would poison accumulated gradients.
///
/// PyTorch: `F.cross_entropy(logits.view(-1, C), targets.view(-1), ignore_index=…,
/// label_smoothing=ε)`.
///
/// ```
/// use neural_arch::losses::{cross_entropy, CrossEntropy};
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// // A language model's logits: batch 1, 3 positions, 2 classes; the last position is padding.
/// let logits = dev.tensor([[[0.0f64, 0.0], [2.0, 0.0], [5.0, -5.0]]]);
/// let opts = CrossEntropy { ignore_index: Some(usize::MAX), ..Default::default() };
/// let loss = cross_entropy(logits, &[0, 0, usize::MAX], opts).unwrap();
/// let want = (2f64.ln() + (1.0 + (-2f64).exp()).ln()) / 2.0;
/// assert!((loss.array() - want).abs() < 1e-12);
/// ```
pub fn cross_entropy<L, const C: usize, E, D, T>(
    logits: L,
    targets: &[usize],
    options: CrossEntropy,
) -> Result<Tensor<Rank0, E, D, T>, Error>
where
    L: ClassLogits<C, E, D, T, Err = D::Err>,
    E: Elem,
    D: Device<E>,
    T: Tape<E, D> + Merge<T>,
    Error: From<D::Err>,
{
    let CrossEntropy {
        ignore_index,
        label_smoothing: eps,
    } = options;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::Config(format!(
            "cross_entropy: label_smoothing must be in [0, 1], got {eps}"
        )));
    }
    let x = logits.try_into_rows()?;
    let rows = x.shape().0;
    if targets.len() != rows {
        return Err(Error::Shape(format!(
            "cross_entropy: {rows} rows of logits but {} targets; give one target per row \
             ((B, T, C) logits take B·T targets, row-major)",
            targets.len()
        )));
    }
    let ignored = |t: usize| ignore_index == Some(t);
    if let Some((position, &target)) = targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t >= C && !ignored(t))
    {
        return Err(Error::TargetOutOfRange {
            target,
            position,
            classes: C,
        });
    }
    let counted = targets.iter().filter(|&&t| !ignored(t)).count();
    if fused_stored::<E, D>() {
        // Half-precision logits are computed on in f32: an f16 sum over a vocabulary stalls
        // at 2048, a bf16 one at 256.
        return Ok(stored_call!(
            E,
            cross_entropy_cpu::<_, _, C, E, D, T>(x, targets, ignore_index, eps, counted)
        )?);
    }
    let logp = x.try_log_softmax::<Axis<1>>()?;
    if counted == 0 {
        return Ok(logp.try_sum::<Rank0, _>()?.try_mul(E::default())?);
    }

    let dev = logp.device().clone();
    let cast = |v: f64| E::from_f64(v).unwrap_or_default();
    // Per-row weights carry the mean and the ignored rows (weight 0), so that one gather and
    // one row sum serve every case.
    let nll_w = cast((1.0 - eps) / counted as f64);
    let weights = targets
        .iter()
        .map(|&t| if ignored(t) { E::default() } else { nll_w })
        .collect();
    let weights = dev.try_tensor_from_vec(weights, (rows,))?;
    let index = targets
        .iter()
        .map(|&t| if ignored(t) { 0 } else { t })
        .collect();
    let index = dev.try_tensor_from_vec(index, (rows,))?;
    let smooth_src = logp.with_empty_tape();
    let picked = logp.try_select(index)?;
    let mut total = picked.try_mul(weights)?.try_sum::<Rank0, _>()?;
    if eps > 0.0 {
        let smooth_w = cast(eps / (C as f64 * counted as f64));
        let weights = targets
            .iter()
            .map(|&t| if ignored(t) { E::default() } else { smooth_w })
            .collect();
        let weights = dev.try_tensor_from_vec(weights, (rows,))?;
        let row_sums = smooth_src.try_sum::<(usize,), Axis<1>>()?;
        total = total.try_add(row_sums.try_mul(weights)?.try_sum::<Rank0, _>()?)?;
    }
    Ok(total.try_negate()?)
}

/// [`cross_entropy`] on the CPU in one kernel, for `S` = `E` = `f32` or `f64`, or `f16` or
/// `bf16` computed in `f32` (row sums in `f64`; see [`Stored`]): per row the maximum, `Σ exp(x − max)` and the loss, and, when training, the
/// gradient `∂ℓ/∂x = p·(a + C·s) − s − a·[c = y]` (`a`, `s` the row's weights of the target
/// and of the smoothing) written over a copy of the logits. Backward scales that by the loss's
/// gradient. dfdx's `log_softmax`, `select` and `sum` make about a dozen passes over the
/// `rows × C` logits, each into a new buffer; this makes four, into one, and for a language
/// model's vocabulary those passes are most of the time outside the matrix products.
fn cross_entropy_cpu<S, F, const C: usize, E, D, T>(
    x: Tensor<(usize, Const<C>), E, D, T>,
    targets: &[usize],
    ignore_index: Option<usize>,
    eps: f64,
    counted: usize,
) -> Result<Tensor<Rank0, E, D, T>, D::Err>
where
    S: Stored<F = F>,
    F: Real,
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D>,
{
    let shape = *x.shape();
    // Free for contiguous logits; a strided view is copied on the tape first.
    let (x, mut tape) = x.try_reshape_like(&shape)?.split_tape();
    let mut d: Vec<F> = S::into_compute(read(&x));
    let denom = counted.max(1) as f64;
    let (nll_w, smooth_w) = ((1.0 - eps) / denom, eps / (C as f64 * denom));
    let f = |v: &F| v.to_f64().unwrap_or(f64::NAN);
    let grad = T::OWNS_TAPE;
    let partial = par_rows(
        &mut d,
        C,
        #[inline(always)]
        |row0, chunk| {
            let mut total = 0.0f64;
            for (row, t) in chunk.chunks_exact_mut(C).zip(&targets[row0..]) {
                if ignore_index == Some(*t) {
                    row.iter_mut().for_each(|v| *v = F::zero());
                    continue;
                }
                let (a, s) = (nll_w, smooth_w);
                let max = max8(row);
                let x_t = f(&row[*t]);
                let x_sum = if s > 0.0 {
                    sum8(row, row, |v, _| f(v))
                } else {
                    0.0
                };
                row.iter_mut().for_each(|v| *v = (*v - max).exp_());
                let sum = sum8(row, row, |e, _| f(e));
                let lse = f(&max) + sum.ln();
                total += a * (lse - x_t) + s * (C as f64 * lse - x_sum);
                if grad {
                    let scale = F::from((a + C as f64 * s) / sum).unwrap_or_else(F::nan);
                    let s = F::from(s).unwrap_or_else(F::nan);
                    row.iter_mut().for_each(|v| *v = *v * scale - s);
                    row[*t] = row[*t] - F::from(a).unwrap_or_else(F::nan);
                }
            }
            total
        },
    );
    let total: f64 = partial.into_iter().sum();
    let dev = x.device().clone();
    let loss = dev.try_tensor_from_vec(vec![E::from_f64(total).unwrap_or_default()], ())?;
    if grad {
        let (x, loss_ghost) = (x.ghost(), loss.ghost());
        tape.add_backward_op(move |grads| {
            let g = cpu_vec::<E, D>(grads.get_or_alloc_mut(&loss_ghost)?).expect(CPU)[0];
            let g = F::from(g.to_f64().unwrap_or(f64::NAN)).unwrap_or_else(F::nan);
            let g_x = as_f::<E, S>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU));
            S::accumulate(g_x, |g_x| {
                par_rows(
                    g_x,
                    C,
                    #[inline(always)]
                    |row0, g_x| {
                        let d = &d[row0 * C..row0 * C + g_x.len()];
                        g_x.iter_mut().zip(d).for_each(|(gx, d)| *gx = *gx + g * *d);
                    },
                );
            });
            Ok(())
        });
    }
    Ok(loss.put_tape(tape))
}

/// Checks that two tensors a loss combines element-wise have the same (runtime) shape.
fn same_shape<S: Shape>(loss: &str, a: &S, b: &S) -> Result<(), Error> {
    if a.concrete() != b.concrete() {
        return Err(Error::Shape(format!(
            "{loss}: the prediction is {:?} but the target is {:?}; they must be the same shape",
            a.concrete(),
            b.concrete()
        )));
    }
    Ok(())
}

/// The mean squared error, `mean((pred − target)²)`.
///
/// # Shapes
/// `pred` and `target` any one shape (checked at run time where dims are runtime sizes:
/// [`Error::Shape`]); the loss is a scalar. `target` carries no gradient.
///
/// PyTorch: `F.mse_loss(pred, target)`.
///
/// ```
/// use neural_arch::losses::mse;
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let loss = mse(dev.tensor([1.0f64, 2.0]), dev.tensor([0.0, 0.0])).unwrap();
/// assert_eq!(loss.array(), 2.5);
/// ```
pub fn mse<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    pred: Tensor<S, E, D, T>,
    target: Tensor<S, E, D>,
) -> Result<Tensor<Rank0, E, D, T>, Error>
where
    Error: From<D::Err>,
{
    same_shape("mse", pred.shape(), target.shape())?;
    Ok(pred.try_sub(target)?.try_square()?.try_mean::<Rank0, _>()?)
}

/// Binary cross-entropy on logits, averaged over all values, in the stable form
/// `max(x, 0) − x·y + ln(1 + e^(−|x|))` (no `sigmoid` then `ln`, which overflows):
///
/// ```text
/// loss = mean(−y·ln σ(x) − (1 − y)·ln(1 − σ(x)))
/// ```
///
/// # Shapes
/// `logits` and `targets` (probabilities in `[0, 1]`) any one shape (runtime sizes checked:
/// [`Error::Shape`]); the loss is a scalar. `targets` carry no gradient.
///
/// PyTorch: `F.binary_cross_entropy_with_logits(logits, targets)`.
///
/// ```
/// use neural_arch::losses::bce_with_logits;
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let loss = bce_with_logits(dev.tensor([0.0f64, 1000.0]), dev.tensor([1.0, 1.0])).unwrap();
/// assert!((loss.array() - 2f64.ln() / 2.0).abs() < 1e-12);
/// ```
pub fn bce_with_logits<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    logits: Tensor<S, E, D, T>,
    targets: Tensor<S, E, D>,
) -> Result<Tensor<Rank0, E, D, T>, Error>
where
    Error: From<D::Err>,
{
    same_shape("bce_with_logits", logits.shape(), targets.shape())?;
    Ok(logits
        .try_bce_with_logits(targets)?
        .try_mean::<Rank0, _>()?)
}

/// Rows divided by their L2 norm (CLIP's `x / x.norm(dim=1, keepdim=True)`, no ε).
fn l2_normalize<N: Dim, const K: usize, E: Dtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<(N, Const<K>), E, D, T>,
) -> Result<Matrix<N, K, E, D, T>, D::Err> {
    let shape = *x.shape();
    let norm = x
        .with_empty_tape()
        .try_square()?
        .try_sum::<(N,), Axis<1>>()?
        .try_sqrt()?
        .try_broadcast_like::<_, Axis<1>>(&shape)?;
    x.try_div(norm)
}

/// CLIP's contrastive loss (Radford et al. 2021, <https://arxiv.org/abs/2103.00020>): the `N`
/// image and text embeddings of a batch are matching pairs; each image must pick its own text
/// among the `N`, and each text its image.
///
/// ```text
/// Î = I / ‖I‖,  T̂ = T / ‖T‖ (rows),   L = e^s · Î·T̂ᵀ   (N × N)
/// loss = ½·(CE(L, 0..N) + CE(Lᵀ, 0..N))
/// ```
///
/// `s` is the learnable `logit_scale` ([`LogitScale`](crate::layers::LogitScale), `ln(1/0.07)`
/// at first); OpenAI clamps `e^s` to at most 100 by clamping `s` after each step
/// ([`LogitScaleModule::clamp`]).
///
/// # Shapes
/// `image` and `text` `[N, K]` (the same `N`, checked at run time: [`Error::Shape`]); the loss
/// is a scalar. Gradients flow to both embeddings and to `logit_scale` (when it is one of the
/// parameters whose gradients are kept: part of the model given to `alloc_grads`).
///
/// PyTorch (OpenAI's and open_clip's training code):
/// `(F.cross_entropy(s.exp() * i @ t.T, labels) + F.cross_entropy(s.exp() * t @ i.T, labels)) / 2`
/// with `i`, `t` normalised and `labels = arange(N)`.
///
/// ```
/// use neural_arch::layers::LogitScale;
/// use neural_arch::losses::clip_loss;
/// use neural_arch::prelude::*;
///
/// let dev = Cpu::default();
/// let scale = dev.build_module::<LogitScale, f64>();
/// // Perfectly matched, orthogonal pairs: a low loss.
/// let img = dev.tensor([[1.0, 0.0], [0.0, 1.0]]);
/// let loss = clip_loss(img.clone(), img, &scale).unwrap();
/// assert!(loss.array() < 1e-5);
/// ```
pub fn clip_loss<N: Dim, const K: usize, E: Elem, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    image: Tensor<(N, Const<K>), E, D, T>,
    text: Tensor<(N, Const<K>), E, D, T>,
    logit_scale: &LogitScaleModule<E, D>,
) -> Result<Tensor<Rank0, E, D, T>, Error>
where
    Error: From<D::Err>,
{
    let n = image.shape().0;
    if text.shape().0.size() != n.size() {
        return Err(Error::Shape(format!(
            "clip_loss: {} image embeddings but {} text embeddings; the batch must hold \
             matching pairs",
            n.size(),
            text.shape().0.size()
        )));
    }
    let image = l2_normalize(image)?;
    let text = l2_normalize(text)?;
    let sim = image.try_matmul(text.try_permute::<(Const<K>, N), Axes2<1, 0>>()?)?;
    let scale = logit_scale
        .logit_scale
        .retaped::<T>()
        .try_exp()?
        .try_broadcast_like(sim.shape())?;
    let logits = sim.try_mul(scale)?;
    let dev = logits.device().clone();
    let diagonal = |dev: &D| dev.try_tensor_from_vec((0..n.size()).collect(), (n,));
    // Row i of the image→text log-probabilities at column i, and column j of the text→image
    // ones (a softmax down the columns of L is one along the rows of Lᵀ) at row j: both
    // diagonals, without transposing L.
    let per_text = logits
        .with_empty_tape()
        .try_log_softmax::<Axis<0>>()?
        .try_select(diagonal(&dev)?)?;
    let per_image = logits
        .try_log_softmax::<Axis<1>>()?
        .try_select(diagonal(&dev)?)?;
    Ok(per_image
        .try_add(per_text)?
        .try_mean::<Rank0, _>()?
        .try_mul(E::from_f64(-0.5).unwrap_or_default())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grads, check_param_grads};
    use crate::layers::cpu_fast::{both_paths, composition_only};
    use crate::layers::LogitScale;
    use crate::prelude::*;
    use dfdx::dtypes::f16;
    use serde_json::Value;

    fn reference() -> Value {
        serde_json::from_str(include_str!("../tests/reference/losses.json"))
            .expect("losses.json parses")
    }

    fn floats(v: &Value) -> Vec<f64> {
        let values = v.as_array().expect("an array of numbers");
        values
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err <= tol,
            "{what}: max |rust - torch| = {err:e}\n{got:?}\n{want:?}"
        );
    }

    fn options(case: &Value) -> CrossEntropy {
        let ignore = case["ignore_index"].as_i64().unwrap();
        CrossEntropy {
            ignore_index: usize::try_from(ignore).ok(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        }
    }

    fn targets(case: &Value) -> Vec<usize> {
        let t = case["targets"].as_array().unwrap();
        t.iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }

    /// The loss and gradient of a reference case, for 2-D `(N, C)` logits.
    fn check_ce_2d<const C: usize>(name: &str) {
        let case = &reference()[name];
        let dev = Cpu::default();
        let shape = case["shape"].as_array().unwrap();
        let n = shape[0].as_u64().unwrap() as usize;
        let x = dev.tensor_from_vec(floats(&case["logits"]), (n, Const::<C>));
        let (t, opts) = (targets(case), options(case));
        let loss = cross_entropy(x.leaky_trace(), &t, opts).unwrap();
        let value = loss.array();
        let grads = loss.backward();
        assert_close(&[value], &[case["loss"].as_f64().unwrap()], 1e-12, name);
        assert_close(&grads.get(&x).as_vec(), &floats(&case["grad"]), 1e-12, name);
        let report = check_input_grads(&x, |x| cross_entropy(x, &t, opts).unwrap());
        assert!(report.max_abs_err <= 1e-6, "{name}: {report}");
        eprintln!("{name} gradcheck: {report}");
    }

    #[test]
    fn cross_entropy_with_ignore_index_and_label_smoothing_matches_torch() {
        both_paths(|_| check_ce_2d::<5>("ce_2d"));
    }

    #[test]
    fn plain_cross_entropy_matches_torch() {
        both_paths(|_| check_ce_2d::<3>("ce_plain"));
    }

    /// The fused CPU kernel in `f32` against the composition of dfdx ops (what other devices
    /// run) in `f64`, on logits large enough to be split over several rayon tasks, with
    /// ignored rows and smoothing; the loss's own gradient (3 here) scales the logits'. The
    /// f32 composition is no closer to the f64 values than the kernel.
    /// Over a language model's vocabulary an f16 sum stops growing at 2048 (its spacing there
    /// is 2): here the composition in f16 reads a loss 0.4 nat low. The fused kernel computes
    /// f16 logits in f32, so only the input, the loss and the gradient are rounded.
    #[test]
    fn half_precision_cross_entropy_accumulates_in_single_precision() {
        const C: usize = 8000;
        let dev = Cpu::seed_from_u64(4);
        let rows = 16;
        let x64: Tensor<(usize, Const<C>), f64, _> =
            dev.sample_normal_like(&(rows, Const)).try_mul(0.5).unwrap();
        let x16 = x64.clone().to_dtype::<f16>();
        // The reference sees the same (rounded) logits.
        let x64 = x16.clone().to_dtype::<f64>();
        let t: Vec<usize> = (0..rows).map(|i| (i * 997) % C).collect();
        let want = cross_entropy(x64.leaky_trace(), &t, Default::default()).unwrap();
        let want_value = want.array();
        let g_want = want.try_mul(1024.0).unwrap().backward().get(&x64).as_vec();
        let loss = cross_entropy(x16.leaky_trace(), &t, Default::default()).unwrap();
        let value = loss.array().to_f64();
        assert!(
            (value - want_value).abs() <= 4e-3,
            "{value} vs {want_value}"
        );
        let g = loss
            .try_mul(f16::from_f32(1024.0))
            .unwrap()
            .backward()
            .get(&x16)
            .as_vec();
        let err = g
            .iter()
            .zip(&g_want)
            .map(|(a, b)| (a.to_f64() - b).abs() / (b.abs() + 1e-3))
            .fold(0.0, f64::max);
        assert!(err <= 2e-3, "gradients differ by {err:e} (relative)");
        let stalled = composition_only(|| {
            cross_entropy(x16.leaky_trace(), &t, Default::default())
                .unwrap()
                .array()
                .to_f64()
        });
        assert!(
            (stalled - want_value).abs() > 0.3,
            "the f16 composition is as far off as this test says: {stalled} vs {want_value}"
        );
    }

    #[test]
    fn fused_cross_entropy_in_f32_matches_the_composition_in_f64() {
        const C: usize = 1000;
        let dev = Cpu::seed_from_u64(3);
        let rows = 37;
        let x64: Tensor<(usize, Const<C>), f64, _> =
            dev.sample_normal_like(&(rows, Const)).try_mul(4.0).unwrap();
        let x32 = x64.clone().to_dtype::<f32>();
        let t: Vec<usize> = (0..rows)
            .map(|i| if i % 5 == 2 { 999 } else { (i * 37) % C })
            .collect();
        for eps in [0.0, 0.1] {
            let opts = CrossEntropy {
                ignore_index: Some(999),
                label_smoothing: eps,
            };
            let loss = cross_entropy(x32.leaky_trace(), &t, opts).unwrap();
            let fused = loss.array() as f64;
            let g_fused = loss.try_mul(3.0).unwrap().backward().get(&x32).as_vec();
            let (want, g_want) = composition_only(|| {
                let loss = cross_entropy(x64.leaky_trace(), &t, opts).unwrap();
                let value = loss.array();
                (
                    value,
                    loss.try_mul(3.0).unwrap().backward().get(&x64).as_vec(),
                )
            });
            assert!(
                (fused - want).abs() <= 1e-6 * want.abs(),
                "{fused} vs {want}"
            );
            let err = g_fused
                .iter()
                .zip(&g_want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(err <= 2e-8, "eps {eps}: gradients differ by {err:e}");
            assert!(g_fused.iter().any(|g| *g != 0.0));
        }
    }

    #[test]
    fn cross_entropy_on_3d_logits_matches_torch() {
        both_paths(|_| cross_entropy_3d());
    }

    fn cross_entropy_3d() {
        let case = &reference()["ce_3d"];
        let dev = Cpu::default();
        let x: Tensor<Rank3<2, 3, 4>, f64, _> =
            dev.tensor_from_vec(floats(&case["logits"]), Default::default());
        let (t, opts) = (targets(case), options(case));
        assert_eq!(opts.ignore_index, Some(0));
        let loss = cross_entropy(x.leaky_trace(), &t, opts).unwrap();
        let value = loss.array();
        let grads = loss.backward();
        assert_close(&[value], &[case["loss"].as_f64().unwrap()], 1e-12, "ce_3d");
        assert_close(
            &grads.get(&x).as_vec(),
            &floats(&case["grad"]),
            1e-12,
            "ce_3d",
        );
        let report = check_input_grads(&x, |x| cross_entropy(x, &t, opts).unwrap());
        assert!(report.max_abs_err <= 1e-6, "ce_3d: {report}");
        eprintln!("ce_3d gradcheck: {report}");
        // Runtime batch and sequence sizes give the same.
        let xr = x.clone().reshape_like(&(2usize, 3usize, Const::<4>));
        let again = cross_entropy(xr, &t, opts).unwrap();
        assert_eq!(again.array(), value);
    }

    #[test]
    fn cross_entropy_rejects_bad_targets_and_options() {
        both_paths(|_| rejects_bad_targets_and_options());
    }

    fn rejects_bad_targets_and_options() {
        let dev = Cpu::default();
        let x: Tensor<Rank2<2, 3>, f64, _> = dev.zeros();
        let opts = CrossEntropy {
            ignore_index: Some(7),
            label_smoothing: 0.0,
        };
        let err = cross_entropy(x.clone(), &[7, 3], opts).unwrap_err();
        assert_eq!(
            err,
            Error::TargetOutOfRange {
                target: 3,
                position: 1,
                classes: 3
            }
        );
        assert!(err.to_string().contains("target 3 at position 1"), "{err}");
        let err = cross_entropy(x.clone(), &[0, 1, 2], opts).unwrap_err();
        assert!(
            err.to_string().contains("2 rows of logits but 3 targets"),
            "{err}"
        );
        let bad = CrossEntropy {
            label_smoothing: 1.5,
            ..opts
        };
        let err = cross_entropy(x.clone(), &[0, 1], bad).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        // All ignored: 0, with zero gradients, not NaN.
        let loss = cross_entropy(x.leaky_trace(), &[7, 7], opts).unwrap();
        assert_eq!(loss.array(), 0.0);
        assert!(loss.backward().get(&x).as_vec().iter().all(|g| *g == 0.0));
    }

    #[test]
    fn mse_matches_torch_and_checks_shapes() {
        let case = &reference()["mse"];
        let dev = Cpu::default();
        let pred: Tensor<Rank2<3, 4>, f64, _> =
            dev.tensor_from_vec(floats(&case["pred"]), Default::default());
        let target: Tensor<Rank2<3, 4>, f64, _> =
            dev.tensor_from_vec(floats(&case["target"]), Default::default());
        let loss = mse(pred.leaky_trace(), target.clone()).unwrap();
        let value = loss.array();
        assert_close(&[value], &[case["loss"].as_f64().unwrap()], 1e-12, "mse");
        assert_close(
            &loss.backward().get(&pred).as_vec(),
            &floats(&case["grad"]),
            1e-12,
            "mse",
        );
        let report = check_input_grads(&pred, |p| mse(p, target.clone()).unwrap());
        assert!(report.max_abs_err <= 1e-6, "mse: {report}");
        eprintln!("mse gradcheck: {report}");
        let a: Tensor<(usize,), f64, _> = dev.zeros_like(&(3,));
        let b: Tensor<(usize,), f64, _> = dev.zeros_like(&(4,));
        let err = mse(a, b).unwrap_err();
        assert!(
            err.to_string().contains("[3] but the target is [4]"),
            "{err}"
        );
    }

    #[test]
    fn bce_with_logits_matches_torch_for_large_logits() {
        let case = &reference()["bce"];
        let dev = Cpu::default();
        let x: Tensor<Rank2<2, 4>, f64, _> =
            dev.tensor_from_vec(floats(&case["logits"]), Default::default());
        let y: Tensor<Rank2<2, 4>, f64, _> =
            dev.tensor_from_vec(floats(&case["targets"]), Default::default());
        let loss = bce_with_logits(x.leaky_trace(), y.clone()).unwrap();
        let value = loss.array();
        assert_close(&[value], &[case["loss"].as_f64().unwrap()], 1e-12, "bce");
        assert_close(
            &loss.backward().get(&x).as_vec(),
            &floats(&case["grad"]),
            1e-12,
            "bce",
        );
        let report = check_input_grads(&x, |x| bce_with_logits(x, y.clone()).unwrap());
        assert!(report.max_abs_err <= 1e-6, "bce: {report}");
        eprintln!("bce gradcheck: {report}");
        let a: Tensor<(usize,), f64, _> = dev.zeros_like(&(2,));
        let err = bce_with_logits(a, dev.zeros_like(&(5,))).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{err}");
    }

    #[test]
    fn clip_loss_matches_torch_and_backpropagates_to_all_three() {
        let case = &reference()["clip"];
        let dev = Cpu::default();
        let img: Tensor<Rank2<4, 3>, f64, _> =
            dev.tensor_from_vec(floats(&case["image"]), Default::default());
        let txt: Tensor<Rank2<4, 3>, f64, _> =
            dev.tensor_from_vec(floats(&case["text"]), Default::default());
        let mut scale = dev.build_module::<LogitScale, f64>();
        assert!((scale.logit_scale.array() - case["logit_scale"].as_f64().unwrap()).abs() < 1e-15);

        // Leaky: keep the gradients of the embeddings too, not only the model's.
        let loss = clip_loss(img.leaky_trace(), txt.leaky_trace(), &scale).unwrap();
        let value = loss.array();
        let g = loss.backward();
        assert_close(
            &[value],
            &[case["loss"].as_f64().unwrap()],
            1e-12,
            "clip loss",
        );
        assert_close(
            &g.get(&img).as_vec(),
            &floats(&case["grad_image"]),
            1e-12,
            "clip d/dimage",
        );
        assert_close(
            &g.get(&txt).as_vec(),
            &floats(&case["grad_text"]),
            1e-12,
            "clip d/dtext",
        );
        assert_close(
            &g.get(&scale.logit_scale).as_vec(),
            &[case["grad_logit_scale"].as_f64().unwrap()],
            1e-12,
            "clip d/dlogit_scale",
        );

        let report = check_input_grads(&img, |i| clip_loss(i, txt.retaped(), &scale).unwrap());
        assert!(report.max_abs_err <= 1e-6, "clip image: {report}");
        eprintln!("clip image gradcheck: {report}");
        let report = check_input_grads(&txt, |t| clip_loss(img.retaped(), t, &scale).unwrap());
        assert!(report.max_abs_err <= 1e-6, "clip text: {report}");
        eprintln!("clip text gradcheck: {report}");
        let report = check_param_grads(&mut scale, |m, grads| {
            clip_loss(img.trace(grads), txt.retaped(), m).unwrap()
        });
        assert_eq!(report.checked, 1);
        assert!(report.max_abs_err <= 1e-6, "clip logit_scale: {report}");
        eprintln!("clip logit_scale gradcheck: {report}");

        let a: Tensor<(usize, Const<3>), f64, _> = dev.zeros_like(&(2, Const));
        let b: Tensor<(usize, Const<3>), f64, _> = dev.zeros_like(&(3, Const));
        let err = clip_loss(a, b, &scale).unwrap_err();
        assert!(
            err.to_string().contains("2 image embeddings but 3 text"),
            "{err}"
        );
    }
}
