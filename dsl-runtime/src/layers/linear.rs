//! Fully connected layers.
//!
//! On the CPU (`f32`, `f64`, and `f16`/`bf16` widened to `f32`, see [`Stored`]) the products
//! run through `faer`'s matrix multiplication, with the bias added in the same pass (the output
//! starts as the bias and the product accumulates into it) and its gradient summed straight
//! from the output's: `faer` picks AVX-512 kernels at run
//! time on stable Rust, where the `gemm` 0.15 that dfdx 0.13 uses has AVX2 only, and measured
//! 1.6-2.7x dfdx's matmul on this project's 2-core Xeon (154 against 57-97 GFLOP/s on one
//! thread, for the shapes of the tiny presets). Other devices compose dfdx's `matmul` and a
//! broadcast add.

use super::cpu_fast::{
    as_f, cpu_vec, filled, fused_cpu, par_rows, read, take_param, Stored, CPU, TASK_ELEMS,
};
use super::{cast, LayerInfo};
use crate::Elem;
use dfdx::nn::{
    BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection, TensorOptions,
};
use dfdx::shapes::{Axes2, Const, Dim, Dtype, HasShape, Rank1, Rank2, Shape};
use dfdx::tensor::{PutTape, SplitTape, Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, Device, PermuteTo, ReshapeTo, TryAdd, TryMatMul};
use half::{bf16, f16};
use rand_distr::Uniform;
use rayon::prelude::*;
use std::any::{Any, TypeId};

/// `y = x Wᵀ + b`, applied to the last dimension: `[*, I] -> [*, O]`.
///
/// Parameters: `weight` `[O, I]`, `bias` `[O]`, initialised uniformly in `±1/√I` as in PyTorch.
/// PyTorch: `torch.nn.Linear(I, O)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let fc = dev.build_module::<Linear<3, 2>, f32>();
/// let y = fc.forward(dev.tensor([[1.0f32, 2.0, 3.0]]));
/// assert_eq!(y.shape().1, Const::<2>);
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Linear<const I: usize, const O: usize>;

/// `y = x Wᵀ` without a bias: `[*, I] -> [*, O]`; parameter `weight` `[O, I]`.
/// PyTorch: `torch.nn.Linear(I, O, bias=False)`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinearNoBias<const I: usize, const O: usize>;

/// The built [`Linear`].
#[derive(Debug, Clone)]
pub struct LinearModule<const I: usize, const O: usize, E: Dtype, D: Storage<E>> {
    /// `[O, I]`, as PyTorch stores it.
    pub weight: Tensor<Rank2<O, I>, E, D>,
    /// `[O]`.
    pub bias: Tensor<Rank1<O>, E, D>,
}

/// The built [`LinearNoBias`].
#[derive(Debug, Clone)]
pub struct LinearNoBiasModule<const I: usize, const O: usize, E: Dtype, D: Storage<E>> {
    /// `[O, I]`, as PyTorch stores it.
    pub weight: Tensor<Rank2<O, I>, E, D>,
}

impl<const I: usize, const O: usize> LayerInfo for Linear<I, O> {
    const PARAMS: usize = I * O + O;
}

impl<const I: usize, const O: usize> LayerInfo for LinearNoBias<I, O> {
    const PARAMS: usize = I * O;
}

impl<const I: usize, const O: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E> for Linear<I, O> {
    type Built = LinearModule<I, O, E, D>;
}

impl<const I: usize, const O: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E>
    for LinearNoBias<I, O>
{
    type Built = LinearNoBiasModule<I, O, E, D>;
}

impl<const I: usize, const O: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for LinearModule<I, O, E, D>
{
}

impl<const I: usize, const O: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for LinearNoBiasModule<I, O, E, D>
{
}

/// PyTorch's (and dfdx's) initialisation of a layer with `fan_in` inputs: `U(±1/√fan_in)`.
pub(crate) fn uniform_init<S: Shape, E: Elem, D: Device<E>>(
    t: &mut Tensor<S, E, D>,
    fan_in: usize,
) -> Result<(), D::Err> {
    let b = super::attention::elem::<E>(1.0 / (fan_in.max(1) as f64).sqrt());
    t.try_fill_with_distr(Uniform::new(-b, b))
}

impl<const I: usize, const O: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for LinearModule<I, O, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = LinearModule<I, O, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::tensor(
                    "weight",
                    |s| &s.weight,
                    |s| &mut s.weight,
                    TensorOptions::reset_with(|t| uniform_init(t, I)),
                ),
                Self::tensor(
                    "bias",
                    |s| &s.bias,
                    |s| &mut s.bias,
                    TensorOptions::reset_with(|t| uniform_init(t, I)),
                ),
            ),
            |(weight, bias)| LinearModule { weight, bias },
        )
    }
}

impl<const I: usize, const O: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for LinearNoBiasModule<I, O, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = LinearNoBiasModule<I, O, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            Self::tensor(
                "weight",
                |s| &s.weight,
                |s| &mut s.weight,
                TensorOptions::reset_with(|t| uniform_init(t, I)),
            ),
            |weight| LinearNoBiasModule { weight },
        )
    }
}

macro_rules! linear_rank {
    ([$($d:ident $v:ident),*]) => {
        impl<const I: usize, const O: usize, $($d: Dim,)* E: Elem, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)* Const<I>,), E, D, T>> for LinearModule<I, O, E, D>
        {
            type Output = Tensor<($($d,)* Const<O>,), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<($($d,)* Const<I>,), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let ($($v,)* _,) = *x.shape();
                let rows = x.shape().num_elements() / I.max(1);
                let x = x.try_reshape_like(&(rows, Const::<I>))?;
                linear(x, &self.weight, Some(&self.bias))?.try_reshape_like(&($($v,)* Const::<O>,))
            }
        }

        impl<const I: usize, const O: usize, $($d: Dim,)* E: Elem, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)* Const<I>,), E, D, T>> for LinearNoBiasModule<I, O, E, D>
        {
            type Output = Tensor<($($d,)* Const<O>,), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<($($d,)* Const<I>,), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let ($($v,)* _,) = *x.shape();
                let rows = x.shape().num_elements() / I.max(1);
                let x = x.try_reshape_like(&(rows, Const::<I>))?;
                linear(x, &self.weight, None)?.try_reshape_like(&($($v,)* Const::<O>,))
            }
        }
    };
}
linear_rank!([]);
linear_rank!([B b]);
linear_rank!([B b, S s]);
linear_rank!([B b, S s, U u]);

/// Rows of width `W`: `[n, W]`.
type Rows<W, E, D, T> = Tensor<(usize, W), E, D, T>;

/// `x Wᵀ (+ b)` for `x` as rows `[n, I]` and a weight `[O, I]` (PyTorch's layout): `[n, O]`.
/// On the CPU in `f32`, `f64`, `f16` and `bf16`, one fused `faer` product each way (see the
/// module documentation); elsewhere dfdx's `matmul` and a broadcast add. What [`Linear`],
/// [`LinearNoBias`], the attention projections and tied unembeddings run.
pub fn linear<Iw: Dim, Ow: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<(usize, Iw), E, D, T>,
    weight: &Tensor<(Ow, Iw), E, D>,
    bias: Option<&Tensor<(Ow,), E, D>>,
) -> Result<Rows<Ow, E, D, T>, D::Err> {
    let (n, i) = *x.shape();
    if fused_cpu::<E, D>() && n > 0 && i.size() > 0 && weight.shape().0.size() > 0 {
        let e = TypeId::of::<E>();
        if e == TypeId::of::<f32>() {
            return linear_cpu::<f32, Iw, Ow, E, D, T>(x, weight, bias);
        } else if e == TypeId::of::<f64>() {
            return linear_cpu::<f64, Iw, Ow, E, D, T>(x, weight, bias);
        } else if e == TypeId::of::<f16>() {
            return linear_cpu::<f16, Iw, Ow, E, D, T>(x, weight, bias);
        } else if e == TypeId::of::<bf16>() {
            return linear_cpu::<bf16, Iw, Ow, E, D, T>(x, weight, bias);
        }
    }
    let y = x.try_matmul(weight.retaped::<T>().try_permute::<_, Axes2<1, 0>>()?)?;
    match bias {
        None => Ok(y),
        Some(b) => {
            let shape = *y.shape();
            y.try_add(b.retaped::<T>().try_broadcast_like(&shape)?)
        }
    }
}

/// The element types `faer` multiplies, for the fused path.
pub(crate) trait Gemm:
    faer::traits::ComplexField + Copy + std::ops::AddAssign + Send + Sync + 'static
{
}
impl Gemm for f32 {}
impl Gemm for f64 {}

/// `faer`'s threads: rayon's pool size (`RAYON_NUM_THREADS`), sequential for one.
pub(crate) fn par() -> faer::Par {
    match std::num::NonZeroUsize::new(rayon::current_num_threads()) {
        Some(n) if n.get() > 1 => faer::Par::Rayon(n),
        _ => faer::Par::Seq,
    }
}

/// [`linear`] on the CPU through `faer`: `y = b + x Wᵀ` (the bias written first, the product
/// accumulated into it); backward `dx += dy W`, `dW += dyᵀ x`, `db += Σ_rows dy`, each a
/// `faer` product or one pass. `x` and `W` are kept for the backward pass as copies in
/// row-major order, in the element type `S` = `E`; `f16` and `bf16` are widened to `f32` for
/// each product and every result (the output, and each gradient after its product is added)
/// is rounded once (see [`Stored`]).
fn linear_cpu<S: Stored, Iw: Dim, Ow: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<(usize, Iw), E, D, T>,
    weight: &Tensor<(Ow, Iw), E, D>,
    bias: Option<&Tensor<(Ow,), E, D>>,
) -> Result<Rows<Ow, E, D, T>, D::Err> {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef};
    let one = <S::F as faer::traits::ComplexField>::one_impl;
    let zero = <S::F as faer::traits::ComplexField>::zero_impl;
    let (n, iw) = *x.shape();
    let ow = weight.shape().0;
    let (i, o) = (iw.size(), ow.size());
    // Free for contiguous rows; a strided view is copied on the tape first.
    let (x, mut tape) = x.try_reshape_like(&(n, iw))?.split_tape();
    let (w, ws): (_, Vec<S>) = take_param(weight, &mut tape);
    let (b, bs): (_, Option<Vec<S>>) = match bias.map(|b| take_param(b, &mut tape)) {
        Some((b, bs)) => (Some(b), Some(bs)),
        None => (None, None),
    };
    let xs: Vec<S> = read(&x);
    let mut y: Vec<S::F> = filled(n * o, zero());
    if let Some(bs) = &bs {
        let bs = S::compute(bs);
        // Row copies on the pool: a `cycle()` iterator wrote one element at a time on the
        // calling thread, a tenth of a BERT step's serial time.
        if o > 0 {
            par_rows(
                &mut y,
                o,
                #[inline(always)]
                |_, rows| {
                    rows.chunks_exact_mut(o)
                        .for_each(|r| r.copy_from_slice(&bs));
                },
            );
        }
    }
    let accum = if b.is_some() {
        Accum::Add
    } else {
        Accum::Replace
    };
    matmul(
        MatMut::from_row_major_slice_mut(&mut y, n, o),
        accum,
        MatRef::from_row_major_slice(&S::compute(&xs), n, i),
        MatRef::from_row_major_slice(&S::compute(&ws), o, i).transpose(),
        one(),
        par(),
    );
    let out = x
        .device()
        .try_tensor_from_vec(cast::<S, E>(S::stored(y)), (n, ow))?;
    if T::OWNS_TAPE {
        let (x, w, b, out_ghost) = (x.ghost(), w.ghost(), b.map(|b| b.ghost()), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            {
                let g: &Vec<S> = (&g_out as &dyn Any).downcast_ref().expect(CPU);
                let g = S::compute(g);
                let gm = MatRef::from_row_major_slice(&g, n, o);
                let g_x = as_f::<E, S>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU));
                S::accumulate(g_x, |g_x| {
                    matmul(
                        MatMut::from_row_major_slice_mut(g_x, n, i),
                        Accum::Add,
                        gm,
                        MatRef::from_row_major_slice(&S::compute(&ws), o, i),
                        one(),
                        par(),
                    )
                });
                let g_w = as_f::<E, S>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&w)?).expect(CPU));
                S::accumulate(g_w, |g_w| {
                    matmul(
                        MatMut::from_row_major_slice_mut(g_w, o, i),
                        Accum::Add,
                        gm.transpose(),
                        MatRef::from_row_major_slice(&S::compute(&xs), n, i),
                        one(),
                        par(),
                    )
                });
                if let Some(b) = b.as_ref().filter(|_| o > 0) {
                    let g_b = as_f::<E, S>(cpu_vec::<E, D>(grads.get_or_alloc_mut(b)?).expect(CPU));
                    // Partial column sums of fixed blocks of rows on the pool, added in order:
                    // the same bits whatever the number of threads.
                    let rows_per_task = (TASK_ELEMS / o).max(1);
                    let partial: Vec<Vec<S::F>> = g
                        .par_chunks(rows_per_task * o)
                        .map(|rows| {
                            let mut sum = vec![zero(); o];
                            for row in rows.chunks_exact(o) {
                                sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
                            }
                            sum
                        })
                        .collect();
                    S::accumulate(g_b, |g_b| {
                        for sum in partial {
                            g_b.iter_mut().zip(sum).for_each(|(gb, v)| *gb += v);
                        }
                    });
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
    use crate::gradcheck::{check_input_grads, check_param_grads};
    use crate::prelude::*;

    #[test]
    fn linear_matches_formula() {
        both_paths(|_| {
            let dev = Cpu::default();
            let mut fc = dev.build_module::<Linear<2, 2>, f64>();
            fc.weight = dev.tensor([[1.0, 2.0], [3.0, 4.0]]);
            fc.bias = dev.tensor([0.5, -0.5]);
            let y = fc.forward(dev.tensor([[1.0, -1.0]]));
            assert_eq!(y.array(), [[1.0 - 2.0 + 0.5, 3.0 - 4.0 - 0.5]]);
            let y = fc.forward(dev.tensor([1.0, -1.0]));
            assert_eq!(y.array(), [1.0 - 2.0 + 0.5, 3.0 - 4.0 - 0.5]);
            assert_eq!(
                fc.num_trainable_params(),
                <Linear<2, 2> as LayerInfo>::PARAMS
            );
            let nb = dev.build_module::<LinearNoBias<2, 3>, f64>();
            assert_eq!(
                nb.num_trainable_params(),
                <LinearNoBias<2, 3> as LayerInfo>::PARAMS
            );
        });
    }

    /// Input and parameter gradients against central differences in f64, on both paths,
    /// with a batch of sequences (rank 3) and with a permuted (strided) input.
    #[test]
    fn gradients_match_central_differences() {
        both_paths(|path| {
            let dev = Cpu::seed_from_u64(1);
            let mut fc = dev.build_module::<Linear<5, 3>, f64>();
            let mut nb = dev.build_module::<LinearNoBias<5, 3>, f64>();
            let x: Tensor<Rank3<2, 4, 5>, f64, _> = dev.sample_normal();
            let r = check_input_grads(&x, |x| fc.forward(x).square().sum());
            assert!(r.max_abs_err < 1e-6, "{path}: {r}");
            let r = check_param_grads(&mut fc, |m, g| m.forward(x.trace(g)).square().sum());
            assert!(r.max_abs_err < 1e-6, "{path}: {r}");
            assert_eq!(r.checked, Linear::<5, 3>::PARAMS);
            let r = check_param_grads(&mut nb, |m, g| m.forward(x.trace(g)).square().sum());
            assert!(r.max_abs_err < 1e-6, "{path}: {r}");
            let xt: Tensor<Rank3<2, 5, 4>, f64, _> = dev.sample_normal();
            let r = check_input_grads(&xt, |x| {
                fc.forward(x.permute::<Rank3<2, 4, 5>, _>()).square().sum()
            });
            assert!(r.max_abs_err < 1e-6, "{path}: {r}");
        });
    }

    /// The fused f32 path against the composition, on a size split over threads by `faer`.
    #[test]
    fn fused_f32_equals_the_composition() {
        let dev = Cpu::seed_from_u64(2);
        let fc = dev.build_module::<Linear<64, 96>, f32>();
        let x: Tensor<(usize, Const<64>), f32, _> = dev.sample_normal_like(&(300, Const));
        let run = || {
            let y = fc.forward(x.trace(Gradients::leaky()));
            let value = y.as_vec();
            let grads = y.square().sum().backward();
            (
                value,
                grads.get(&fc.weight).as_vec(),
                grads.get(&fc.bias).as_vec(),
                grads.get(&x).as_vec(),
            )
        };
        let fused = run();
        let composed = super::super::cpu_fast::composition_only(run);
        let close = |a: &[f32], b: &[f32], what: &str| {
            let err = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                .fold(0.0f32, f32::max);
            assert!(err < 1e-4, "{what}: {err}");
        };
        close(&fused.0, &composed.0, "output");
        close(&fused.1, &composed.1, "weight gradient");
        close(&fused.2, &composed.2, "bias gradient");
        close(&fused.3, &composed.3, "input gradient");
    }

    /// `f16` and `bf16` on the CPU: the output and every gradient within one spacing of the
    /// exact value from the same half inputs (computed in f64), plus the f32 accumulation's own
    /// error; a size that the widening splits over several blocks.
    #[test]
    fn half_linear_computes_in_f32_and_rounds_once() {
        half_linear_rounds_once::<half::f16>(2f64.powi(-10));
        half_linear_rounds_once::<half::bf16>(2f64.powi(-7));
    }

    fn half_linear_rounds_once<H: crate::Elem>(spacing: f64)
    where
        Cpu: Device<H>,
    {
        let (n, i, o) = (300, 128, 96);
        let dev = Cpu::seed_from_u64(3);
        let fc = dev.build_module::<Linear<128, 96>, H>();
        // Spread, sign-mixed values without a sampler (half types have none).
        let wave = |len: usize, phase: f64| -> Vec<H> {
            (0..len)
                .map(|k| H::from_f64(2.0 * (0.7391 * k as f64 + phase).sin()).unwrap())
                .collect()
        };
        let x = dev.tensor_from_vec(wave(n * i, 0.0), (n, Const::<128>));
        // The output's gradient: the loss is Σ y ⊙ c.
        let c = dev.tensor_from_vec(wave(n * o, 1.0), (n, Const::<96>));
        let y = fc.forward(x.leaky_trace());
        let values = y.as_vec();
        let grads = (y * c.clone()).sum().backward();
        let f = |v: &[H]| v.iter().map(|v| v.to_f64().unwrap()).collect::<Vec<f64>>();
        let (xs, ws, bs, cs) = (
            f(&x.as_vec()),
            f(&fc.weight.as_vec()),
            f(&fc.bias.as_vec()),
            f(&c.as_vec()),
        );
        let check = |what: &str, got: H, terms: &mut dyn Iterator<Item = f64>| {
            let (mut want, mut size) = (0.0, 0.0);
            for t in terms {
                want += t;
                size += t.abs();
            }
            let got = got.to_f64().unwrap();
            assert!(
                (got - want).abs() <= spacing * want.abs() + 1e-6 * size,
                "{what}: {got}, the exact {want}"
            );
        };
        for r in 0..n {
            for k in 0..o {
                let mut terms = (0..i).map(|j| xs[r * i + j] * ws[k * i + j]);
                let mut terms = terms.by_ref().chain([bs[k]]);
                check(&format!("y[{r}][{k}]"), values[r * o + k], &mut terms);
            }
        }
        let (g_x, g_w, g_b) = (
            grads.get(&x).as_vec(),
            grads.get(&fc.weight).as_vec(),
            grads.get(&fc.bias).as_vec(),
        );
        for r in 0..n {
            for j in 0..i {
                let mut terms = (0..o).map(|k| cs[r * o + k] * ws[k * i + j]);
                check(&format!("dx[{r}][{j}]"), g_x[r * i + j], &mut terms);
            }
        }
        for k in 0..o {
            for j in 0..i {
                let mut terms = (0..n).map(|r| cs[r * o + k] * xs[r * i + j]);
                check(&format!("dW[{k}][{j}]"), g_w[k * i + j], &mut terms);
            }
            let mut terms = (0..n).map(|r| cs[r * o + k]);
            check(&format!("db[{k}]"), g_b[k], &mut terms);
        }
    }
}
