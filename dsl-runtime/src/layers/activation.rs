//! Element-wise activations and the softmax family. All are parameter-free and accept any shape.
//!
//! ReLU, GELU (exact and tanh), SiLU, Softmax and LogSoftmax have fused kernels on the CPU for
//! `f32` and `f64` (computed in the element type, as PyTorch does), split over rayon's pool
//! (`RAYON_NUM_THREADS`) for large inputs; ReLU, GELU, SiLU and QuickGELU also for `f16` and
//! `bf16` (computed in `f32` and rounded once, as PyTorch's CPU kernels do). Other devices and element
//! types compose dfdx ops.
//! Measured in f32 on one thread (release, shared machine; `examples/fused_cpu_bench.rs`):
//! GELU forward on `[8, 128, 3072]` 7.1 ms instead of 20 ms, softmax on `[8, 12, 128, 128]`
//! 3.1 ms instead of 6.6 ms.

use super::cpu_fast::{
    cpu_vec, filled, for_chunks, for_chunks2, fused_float, fused_stored, max8, par_rows, sum8,
    HalfSlice, CPU, TASK_ELEMS,
};
use super::LayerInfo;
use dfdx::nn::{Module, NonMutableModule, ZeroSizedModule};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{PutTape, SplitTape, Tape, Tensor, WithEmptyTape};
use dfdx::tensor_ops::{Device, ReshapeTo, TryAdd, TryMul, TrySub};
use half::{bf16, f16};
use num_traits::{Float, FloatConst};
use std::any::{Any, TypeId};

macro_rules! activation {
    ($(#[$doc:meta])* $name:ident, |$x:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $name;
        impl ZeroSizedModule for $name {}
        impl NonMutableModule for $name {}
        impl LayerInfo for $name {
            const PARAMS: usize = 0;
        }
        impl<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>> Module<Tensor<S, E, D, T>> for $name {
            type Output = Tensor<S, E, D, T>;
            type Error = D::Err;
            fn try_forward(&self, $x: Tensor<S, E, D, T>) -> Result<Self::Output, D::Err> {
                $body
            }
        }
    };
}

activation!(
    /// `max(0, x)`, with gradient 0 where `x ≤ 0` and 1 elsewhere. PyTorch: `torch.nn.ReLU()`.
    ///
    /// The fused CPU kernel keeps a NaN input NaN and passes the gradient through it, as PyTorch
    /// does (so that a mixed-precision step sees the NaN and is skipped); dfdx's composition,
    /// which other devices run, computes `x.max(0)`, which is 0 for NaN.
    ReLU, |x| {
        if fused_unary::<S, E, D>(x.shape()) {
            return unary_cpu::<ReluOp, S, E, D, T>(x);
        }
        x.try_relu()
    }
);
activation!(
    /// Exact GELU, `x·Φ(x) = x/2·(1 + erf(x/√2))`. PyTorch: `torch.nn.GELU()`.
    ///
    /// The gradient is `Φ(x) + x·φ(x)`. dfdx 0.13's `accurate_gelu` computes the value right but
    /// drops the `1/√2` of the chain rule through `erf(x/√2)` in the second term (its gradient
    /// is off by up to 0.22 near |x| = 1, found by `accuracy-report`), so a term whose value is
    /// exactly zero and whose gradient is the missing difference is added:
    /// `k·e(x) - k·e(x)` with `e(x) = exp(-x²/2)`, the first on the tape, the second not, and
    /// `k = 1/√π - 1/√(2π)`.
    ///
    /// The fused CPU kernel computes `Φ(x) + x·φ(x)` directly and needs no correction.
    Gelu, |x| {
        if fused_unary::<S, E, D>(x.shape()) {
            return unary_cpu::<GeluExact, S, E, D, T>(x);
        }
        let k = 1.0 / std::f64::consts::PI.sqrt() - 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        let (k, half) = (E::from_f64(k).unwrap_or_default(), E::from_f64(-0.5).unwrap_or_default());
        let bump = |t: Tensor<S, E, D, T>| -> Result<Tensor<S, E, D, T>, D::Err> {
            t.try_square()?.try_mul(half)?.try_exp()?.try_mul(k)
        };
        let taped = bump(x.with_empty_tape())?;
        let constant = bump(x.with_empty_tape())?.retaped::<T>();
        // `taped - constant` is exactly zero, so the value is dfdx's to the last bit.
        let zero = taped.try_sub(constant)?;
        x.try_accurate_gelu()?.try_add(zero)
    }
);
activation!(
    /// GELU's tanh approximation, `x/2·(1 + tanh(√(2/π)(x + 0.044715x³)))`, as in GPT-2.
    /// PyTorch: `torch.nn.GELU(approximate="tanh")`.
    GeluTanh, |x| {
        if fused_unary::<S, E, D>(x.shape()) {
            return unary_cpu::<GeluTanhOp, S, E, D, T>(x);
        }
        x.try_fast_gelu()
    }
);
activation!(
    /// `x·σ(x)`, also called swish. PyTorch: `torch.nn.SiLU()`.
    SiLU, |x| {
        if fused_unary::<S, E, D>(x.shape()) {
            return unary_cpu::<SiluOp, S, E, D, T>(x);
        }
        let s = x.retaped::<T>().try_sigmoid()?;
        x.try_mul(s)
    }
);
activation!(
    /// `x·σ(1.702·x)`, the sigmoid approximation of GELU that OpenAI's CLIP was trained with
    /// (Hendrycks & Gimpel, <https://arxiv.org/abs/1606.08415>, §2). Within 0.021 of exact
    /// GELU, but a checkpoint trained with it must run with it.
    ///
    /// The gradient is `σ(1.702x) + 1.702·x·σ(1.702x)·(1 − σ(1.702x))`.
    ///
    /// PyTorch: `x * torch.sigmoid(1.702 * x)`; Hugging Face's `ACT2FN["quick_gelu"]`.
    QuickGelu, |x| {
        if fused_unary::<S, E, D>(x.shape()) {
            return unary_cpu::<QuickGeluOp, S, E, D, T>(x);
        }
        let s = x
            .retaped::<T>()
            .try_mul(E::from_f64(1.702).unwrap_or_default())?
            .try_sigmoid()?;
        x.try_mul(s)
    }
);
activation!(
    /// `1 / (1 + e⁻ˣ)`. PyTorch: `torch.nn.Sigmoid()`.
    Sigmoid, |x| x.try_sigmoid()
);
activation!(
    /// `tanh(x)`. PyTorch: `torch.nn.Tanh()`.
    Tanh, |x| x.try_tanh()
);
activation!(
    /// `eˣⁱ / Σⱼ eˣʲ` over the last dimension, computed stably (the maximum is subtracted first).
    /// PyTorch: `torch.nn.Softmax(dim=-1)`.
    Softmax, |x| {
        if fused_real::<S, E, D>(x.shape()) {
            return softmax_cpu::<false, S, E, D, T>(x, None);
        }
        x.try_softmax::<S::LastAxis>()
    }
);
activation!(
    /// `xᵢ - log Σⱼ eˣʲ` over the last dimension, computed stably.
    /// PyTorch: `torch.nn.LogSoftmax(dim=-1)`.
    LogSoftmax, |x| {
        if fused_real::<S, E, D>(x.shape()) {
            return softmax_cpu::<true, S, E, D, T>(x, None);
        }
        x.try_log_softmax::<S::LastAxis>()
    }
);

/// The element types the fused kernels compute in, with the functions they need.
///
/// `f64` uses `libm` and `std`, so that the fused kernels agree with dfdx's to 1e-12. `f32`
/// uses inlined approximations (Cephes' `expf`, the Abramowitz & Stegun `erf` that PyTorch's
/// vectorised CPU kernels use; errors around 1e-7): `libm::erff` and `expf` are out-of-line
/// calls, and `perf` showed them taking most of a GELU pass.
pub(crate) trait Real: Float + FloatConst + Send + Sync + 'static {
    fn erf(self) -> Self;
    fn exp_(self) -> Self;
    fn tanh_(self) -> Self;
}
impl Real for f64 {
    #[inline(always)]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        self.tanh()
    }
}
impl Real for f32 {
    /// Abramowitz & Stegun 7.1.26, `|error| ≤ 1.5e-7`, the formula of PyTorch's vectorised
    /// CPU `erf`.
    #[inline(always)]
    fn erf(self) -> Self {
        let a = self.abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * a);
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
        (1.0 - poly * (-a * a).exp_()).copysign(self)
    }
    /// Cephes' `expf`: `eˣ = 2ⁿ·eʳ` with `n = round(x/ln 2)`, `|r| ≤ ln 2 / 2`, and a degree-7
    /// polynomial for `eʳ`. Inputs are clamped to `[-87, 88]`, so `e⁻¹⁰⁰⁰` comes out `1.6e-38`
    /// instead of 0 and `e¹⁰⁰⁰` `1.7e38` instead of infinity: no softmax, GELU or SiLU value
    /// changes by more than that.
    #[inline(always)]
    fn exp_(self) -> Self {
        let x = self.clamp(-87.0, 88.0);
        // Adding and removing 1.5·2²³ rounds to the nearest integer without SSE4.1's `roundps`.
        let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let e_r = p * r * r + r + 1.0;
        e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        // 1 - 2/(e²ˣ + 1) loses the relative precision of tanh near 0, where x itself is right.
        if self.abs() < 0.03 {
            let x2 = self * self;
            self * (1.0 - x2 / 3.0 * (1.0 - 0.4 * x2))
        } else {
            1.0 - 2.0 / ((2.0 * self).exp_() + 1.0)
        }
    }
}

/// Whether a fused kernel takes this input: a non-empty `f32` or `f64` tensor on the CPU.
fn fused_real<S: Shape, E: Dtype, D: Device<E>>(shape: &S) -> bool {
    shape.num_elements() > 0 && fused_float::<E, D>()
}

/// Whether the fused element-wise kernels ([`unary_cpu`]) take this input: a non-empty `f32`,
/// `f64`, `f16` or `bf16` tensor on the CPU. The half types are computed in `f32`, a block at
/// a time, as PyTorch's CPU kernels compute them: `half` converts a slice with F16C, where its
/// scalar `f16` arithmetic (what dfdx's composition runs) converts every operand on its own.
fn fused_unary<S: Shape, E: Dtype, D: Device<E>>(shape: &S) -> bool {
    shape.num_elements() > 0 && fused_stored::<E, D>()
}

/// `v` as the `Vec<B>` it is, for `A` and `B` the same type (checked by the caller).
pub(crate) fn cast<A: 'static, B: 'static>(v: Vec<A>) -> Vec<B> {
    *(Box::new(v) as Box<dyn Any>)
        .downcast::<Vec<B>>()
        .expect("fused_real checked the element type")
}

/// An element-wise function and its derivative.
trait Unary: 'static {
    fn f<F: Real>(x: F) -> F;
    fn df<F: Real>(x: F) -> F;
}

#[inline(always)]
fn c<F: Real>(v: f64) -> F {
    F::from(v).unwrap()
}

/// `x ≤ 0 ? 0 : x`: NaN stays NaN, and its derivative is 1 (PyTorch's `threshold_backward`
/// tests the output `≤ 0`).
struct ReluOp;
impl Unary for ReluOp {
    #[inline(always)]
    fn f<F: Real>(x: F) -> F {
        if x <= F::zero() {
            F::zero()
        } else {
            x
        }
    }
    #[inline(always)]
    fn df<F: Real>(x: F) -> F {
        if x <= F::zero() {
            F::zero()
        } else {
            F::one()
        }
    }
}

struct GeluExact;
impl Unary for GeluExact {
    #[inline(always)]
    fn f<F: Real>(x: F) -> F {
        c::<F>(0.5) * x * (F::one() + (x * F::FRAC_1_SQRT_2()).erf())
    }
    #[inline(always)]
    fn df<F: Real>(x: F) -> F {
        // Φ(x) + x·φ(x), φ(x) = e^(-x²/2)/√(2π).
        let cdf = c::<F>(0.5) * (F::one() + (x * F::FRAC_1_SQRT_2()).erf());
        let pdf = (c::<F>(-0.5) * x * x).exp_() * c::<F>(0.398_942_280_401_432_7);
        cdf + x * pdf
    }
}

struct GeluTanhOp;
impl GeluTanhOp {
    /// `tanh(√(2/π)(x + 0.044715x³))`.
    #[inline(always)]
    fn t<F: Real>(x: F) -> F {
        (c::<F>(0.797_884_560_802_865_4) * (x + c::<F>(0.044715) * x * x * x)).tanh_()
    }
}
impl Unary for GeluTanhOp {
    #[inline(always)]
    fn f<F: Real>(x: F) -> F {
        c::<F>(0.5) * x * (F::one() + Self::t(x))
    }
    #[inline(always)]
    fn df<F: Real>(x: F) -> F {
        let t = Self::t(x);
        let inner = c::<F>(0.797_884_560_802_865_4) * (F::one() + c::<F>(3.0 * 0.044715) * x * x);
        c::<F>(0.5) * (F::one() + t) + c::<F>(0.5) * x * (F::one() - t * t) * inner
    }
}

struct SiluOp;
impl Unary for SiluOp {
    #[inline(always)]
    fn f<F: Real>(x: F) -> F {
        x / (F::one() + (-x).exp_())
    }
    #[inline(always)]
    fn df<F: Real>(x: F) -> F {
        let s = F::one() / (F::one() + (-x).exp_());
        s * (F::one() + x * (F::one() - s))
    }
}

/// `x·σ(1.702x)`. dfdx's composition calls glibc's `expf`, whose slow path for large
/// arguments took two thirds of a CLIP tiny training step.
struct QuickGeluOp;
impl Unary for QuickGeluOp {
    #[inline(always)]
    fn f<F: Real>(x: F) -> F {
        x / (F::one() + (c::<F>(-1.702) * x).exp_())
    }
    #[inline(always)]
    fn df<F: Real>(x: F) -> F {
        let s = F::one() / (F::one() + (c::<F>(-1.702) * x).exp_());
        s * (F::one() + c::<F>(1.702) * x * (F::one() - s))
    }
}

/// An element-wise function on the CPU in one pass forward (`K::f`, and `K::df` when training)
/// and one backward (`g·K::df(x)` from the saved derivatives), in `F` = the element type.
fn unary_cpu<K: Unary, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    if TypeId::of::<E>() == TypeId::of::<f32>() {
        unary_real::<K, f32, S, E, D, T>(x)
    } else if TypeId::of::<E>() == TypeId::of::<f16>() {
        unary_half::<K, f16, S, E, D, T>(x)
    } else if TypeId::of::<E>() == TypeId::of::<bf16>() {
        unary_half::<K, bf16, S, E, D, T>(x)
    } else {
        unary_real::<K, f64, S, E, D, T>(x)
    }
}

/// [`unary_real`] for a half type `H` (= `E`): each block of the input is widened to `f32`,
/// `K::f` and `K::df` run in `f32`, and the results are rounded once. Training keeps the
/// derivatives in `H`, half of what `f32` would keep; the backward pass widens the gradient,
/// the derivatives and the input's gradient, multiplies and adds in `f32`, and rounds once.
fn unary_half<K: Unary, H: HalfSlice, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    let shape = *x.shape();
    let n = shape.num_elements();
    let (x, mut tape) = x.try_reshape_like(&shape)?.split_tape();
    let mut xs = filled(n, E::default());
    x.copy_into(&mut xs);
    let xs: Vec<H> = cast(xs);
    let mut out = filled(n, H::default());
    let mut dfs = if T::OWNS_TAPE {
        filled(n, H::default())
    } else {
        Vec::new()
    };
    let block = |i: usize, out: &mut [H], dfs: &mut [H]| {
        let at = i * TASK_ELEMS;
        let mut v = vec![0.0f32; out.len()];
        H::widen(&xs[at..at + out.len()], &mut v);
        if dfs.is_empty() {
            v.iter_mut().for_each(|y| *y = K::f(*y));
        } else {
            let mut d = vec![0.0f32; out.len()];
            for (y, d) in v.iter_mut().zip(&mut d) {
                let x = *y;
                (*y, *d) = (K::f(x), K::df(x));
            }
            H::narrow(&d, dfs);
        }
        H::narrow(&v, out);
    };
    if T::OWNS_TAPE {
        for_chunks2(&mut out, TASK_ELEMS, &mut dfs, TASK_ELEMS, block);
    } else {
        for_chunks(
            &mut out,
            TASK_ELEMS,
            #[inline(always)]
            |i, out| block(i, out, &mut []),
        );
    }
    let out = x.device().try_tensor_from_vec(cast::<H, E>(out), shape)?;
    if T::OWNS_TAPE {
        let (x, out_ghost) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            {
                let g: &Vec<H> = (&g_out as &dyn Any).downcast_ref().expect(CPU);
                let g_x = cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU);
                let g_x: &mut Vec<H> = (g_x as &mut dyn Any).downcast_mut().expect(CPU);
                for_chunks(
                    g_x,
                    TASK_ELEMS,
                    #[inline(always)]
                    |i, g_x| {
                        let (at, len) = (i * TASK_ELEMS, g_x.len());
                        let (mut acc, mut gw, mut dw) =
                            (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
                        H::widen(g_x, &mut acc);
                        H::widen(&g[at..at + len], &mut gw);
                        H::widen(&dfs[at..at + len], &mut dw);
                        for ((a, g), d) in acc.iter_mut().zip(&gw).zip(&dw) {
                            *a += g * d;
                        }
                        H::narrow(&acc, g_x);
                    },
                );
            }
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

fn unary_real<K: Unary, F: Real, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    let shape = *x.shape();
    let n = shape.num_elements();
    // Free for a contiguous tensor; a strided view is copied, on the tape, into row-major order.
    let (x, mut tape) = x.try_reshape_like(&shape)?.split_tape();
    // The output is computed in place in a copy of the input: one buffer less to allocate and
    // fault in, which is a good part of an element-wise pass.
    let mut out = filled(n, E::default());
    x.copy_into(&mut out);
    let mut out: Vec<F> = cast(out);
    // Training keeps the derivative at each input rather than the input: it comes from the same
    // exponentials in the same pass, and the backward pass is then one multiplication.
    let mut dfs = Vec::new();
    if T::OWNS_TAPE {
        dfs = filled(n, F::zero());
        for_chunks2(
            &mut out,
            TASK_ELEMS,
            &mut dfs,
            TASK_ELEMS,
            #[inline(always)]
            |_, out, dfs| {
                for (y, d) in out.iter_mut().zip(dfs) {
                    let x = *y;
                    (*y, *d) = (K::f(x), K::df(x));
                }
            },
        );
    } else {
        par_rows(
            &mut out,
            1,
            #[inline(always)]
            |_, out| {
                for y in out.iter_mut() {
                    *y = K::f(*y);
                }
            },
        );
    }
    let out = x.device().try_tensor_from_vec(cast::<F, E>(out), shape)?;
    if T::OWNS_TAPE {
        let (x, out_ghost) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            // Two buffers, and the API lends one at a time: take the output's gradient out of
            // its slot and put it back afterwards.
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            {
                let g: &Vec<F> = (&g_out as &dyn Any).downcast_ref().expect(CPU);
                let g_x = cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU);
                let g_x: &mut Vec<F> = (g_x as &mut dyn Any).downcast_mut().expect(CPU);
                par_rows(
                    g_x,
                    1,
                    #[inline(always)]
                    |i0, g_x| {
                        for ((gx, &d), &g) in g_x.iter_mut().zip(&dfs[i0..]).zip(&g[i0..]) {
                            *gx = *gx + g * d;
                        }
                    },
                );
            }
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// Where a masked softmax over the last axis may look.
pub(crate) enum Mask {
    /// One flag per score, row-major: false scores get weight 0 and no gradient. A row with
    /// nothing kept becomes all zeros when `empty_rows_zero` (PyTorch's
    /// `scaled_dot_product_attention`), else uniform (the softmax of equal fill values), with
    /// no gradient to the scores either way.
    Flags {
        /// The flags, as many as scores.
        keep: Vec<bool>,
        /// What a row with nothing kept becomes.
        empty_rows_zero: bool,
    },
    /// Causal attention over a cache of `past` positions: row `i` is the query at position
    /// `i mod queries` and sees the keys `0..=past + i mod queries`.
    Causal {
        /// Queries per block of rows.
        queries: usize,
        /// Cached positions before the first query.
        past: usize,
    },
}

impl Mask {
    /// Row `i`'s flags, or the number of leading scores it keeps.
    pub(crate) fn row(&self, i: usize, m: usize) -> Result<&[bool], usize> {
        match self {
            Mask::Flags { keep, .. } => Ok(&keep[i * m..(i + 1) * m]),
            Mask::Causal { queries, past } => Err((past + i % queries + 1).min(m)),
        }
    }
}

/// Softmax (`LOG` false) or LogSoftmax over the last axis on the CPU, one pass per row each way,
/// in `F` = the element type with the row sums in `f64`. The row maximum is subtracted before
/// `exp`. Backward from the saved output `y`: softmax `dx = y·(g - Σ g·y)`, log-softmax
/// `dx = g - eʸ·Σ g`. With a [`Mask`] (softmax only), masked scores take no part: weight 0,
/// gradient 0, as `keep.choose(x, −∞)` followed by a softmax gives.
pub(crate) fn softmax_cpu<const LOG: bool, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
    mask: Option<Mask>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    debug_assert!(!LOG || mask.is_none(), "masks are for softmax");
    if TypeId::of::<E>() == TypeId::of::<f32>() {
        softmax_real::<LOG, f32, S, E, D, T>(x, mask)
    } else {
        softmax_real::<LOG, f64, S, E, D, T>(x, mask)
    }
}

/// The masked softmax of one row in place: `keep` is the row's flags (`Ok`) or the number of
/// leading scores it keeps (`Err`), as [`Mask::row`] gives them. Masked scores become exactly 0;
/// a row with nothing kept becomes all zeros when `empty_zero`, else uniform.
#[inline(always)]
pub(crate) fn softmax_row<F: Real>(y: &mut [F], keep: Result<&[bool], usize>, empty_zero: bool) {
    let kept = match keep {
        Ok(k) if !k.iter().any(|&k| k) => {
            let fill = if empty_zero {
                0.0
            } else {
                1.0 / y.len() as f64
            };
            y.iter_mut().for_each(|y| *y = F::from(fill).unwrap());
            return;
        }
        Ok(k) => {
            let max = (y.iter().zip(k))
                .filter(|(_, &k)| k)
                .fold(F::neg_infinity(), |a, (&b, _)| a.max(b));
            for (y, &k) in y.iter_mut().zip(k) {
                *y = if k { (*y - max).exp_() } else { F::zero() };
            }
            &mut y[..]
        }
        Err(len) => {
            let (kept, rest) = y.split_at_mut(len);
            rest.iter_mut().for_each(|y| *y = F::zero());
            let max = max8(kept);
            kept.iter_mut().for_each(|y| *y = (*y - max).exp_());
            kept
        }
    };
    let inv = F::from(1.0 / sum8(kept, kept, |e, _| e.to_f64().unwrap())).unwrap();
    kept.iter_mut().for_each(|y| *y = *y * inv);
}

fn softmax_real<const LOG: bool, F: Real, S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
    mask: Option<Mask>,
) -> Result<Tensor<S, E, D, T>, D::Err> {
    let shape = *x.shape();
    let n = shape.num_elements();
    let m = shape.concrete().into_iter().last().unwrap_or(1);
    let (x, mut tape) = x.try_reshape_like(&shape)?.split_tape();
    let f64_ = |v: &F| v.to_f64().unwrap();
    // In place in a copy of the input: one buffer less to allocate and fault in.
    let mut out = filled(n, E::default());
    x.copy_into(&mut out);
    let mut out: Vec<F> = cast(out);
    let empty_zero = matches!(
        mask,
        Some(Mask::Flags {
            empty_rows_zero: true,
            ..
        })
    );
    par_rows(
        &mut out,
        m,
        #[inline(always)]
        |row0, out| {
            for (i, y) in out.chunks_exact_mut(m).enumerate() {
                if let Some(mask) = &mask {
                    softmax_row(y, mask.row(row0 + i, m), empty_zero);
                    continue;
                }
                let max = max8(y);
                if LOG {
                    let sum = sum8(y, y, |v, _| f64_(&(*v - max).exp_()));
                    let shift = max + F::from(sum.ln()).unwrap();
                    y.iter_mut().for_each(|y| *y = *y - shift);
                } else {
                    y.iter_mut().for_each(|y| *y = (*y - max).exp_());
                    let inv = F::from(1.0 / sum8(y, y, |e, _| f64_(e))).unwrap();
                    y.iter_mut().for_each(|y| *y = *y * inv);
                }
            }
        },
    );
    let saved = T::OWNS_TAPE.then(|| out.clone());
    let out = x.device().try_tensor_from_vec(cast::<F, E>(out), shape)?;
    if let Some(ys) = saved {
        let (x, out_ghost) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            {
                let g: &Vec<F> = (&g_out as &dyn Any).downcast_ref().expect(CPU);
                let g_x = cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU);
                let g_x: &mut Vec<F> = (g_x as &mut dyn Any).downcast_mut().expect(CPU);
                par_rows(
                    g_x,
                    m,
                    #[inline(always)]
                    |i0, g_x| {
                        let span = i0 * m..i0 * m + g_x.len();
                        let rows = ys[span.clone()]
                            .chunks_exact(m)
                            .zip(g[span.clone()].chunks_exact(m));
                        for (j, ((y, g), gx)) in rows.zip(g_x.chunks_exact_mut(m)).enumerate() {
                            if LOG {
                                let s = F::from(sum8(g, g, |g, _| f64_(g))).unwrap();
                                for ((gx, &y), &g) in gx.iter_mut().zip(y).zip(g) {
                                    *gx = *gx + g - y.exp_() * s;
                                }
                            } else if let Some(mask) = &mask {
                                let s = F::from(sum8(g, y, |g, y| f64_(g) * f64_(y))).unwrap();
                                match mask.row(i0 + j, m) {
                                    Ok(k) => {
                                        for (((gx, &y), &g), &k) in
                                            gx.iter_mut().zip(y).zip(g).zip(k)
                                        {
                                            if k {
                                                *gx = *gx + y * (g - s);
                                            }
                                        }
                                    }
                                    Err(len) => {
                                        for ((gx, &y), &g) in gx[..len].iter_mut().zip(y).zip(g) {
                                            *gx = *gx + y * (g - s);
                                        }
                                    }
                                }
                            } else {
                                let s = F::from(sum8(g, y, |g, y| f64_(g) * f64_(y))).unwrap();
                                for ((gx, &y), &g) in gx.iter_mut().zip(y).zip(g) {
                                    *gx = *gx + y * (g - s);
                                }
                            }
                        }
                    },
                );
            }
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

#[cfg(test)]
pub(super) mod fused_reference {
    //! The cases written by `tools/reference/fused_cpu.py`, shared with `layer_norm.rs`.

    use serde_json::Value;

    /// The case called `name`.
    pub fn case(name: &str) -> Value {
        let file: Value =
            serde_json::from_str(include_str!("../../tests/reference/fused_cpu.json"))
                .expect("fused_cpu.json parses");
        file["cases"]
            .as_array()
            .expect("a list of cases")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no case {name} in fused_cpu.json"))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu_fast::{both_paths, composition_only};
    use super::super::embedding::reference::{assert_close, floats};
    use super::fused_reference::case;
    use crate::gradcheck::check_input_grads;
    use crate::prelude::*;

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn activations_match_their_formulas() {
        both_paths(|_| formulas());
    }

    fn formulas() {
        let dev = Cpu::default();
        let xs = [-2.0f64, -0.5, 0.0, 0.7, 3.0];
        let x = || dev.tensor(xs);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        close(&ReLU.forward(x()).array(), &xs.map(|v| v.max(0.0)));
        close(&SiLU.forward(x()).array(), &xs.map(|v| v * sig(v)));
        close(&Sigmoid.forward(x()).array(), &xs.map(sig));
        close(&Tanh.forward(x()).array(), &xs.map(f64::tanh));
        let c = (2.0 / std::f64::consts::PI).sqrt();
        close(
            &GeluTanh.forward(x()).array(),
            &xs.map(|v| 0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())),
        );
        let sum: f64 = xs.iter().map(|v| v.exp()).sum();
        close(&Softmax.forward(x()).array(), &xs.map(|v| v.exp() / sum));
        close(&LogSoftmax.forward(x()).array(), &xs.map(|v| v - sum.ln()));
        let report =
            crate::gradcheck::check_input_grads(&dev.tensor(xs), |x| Gelu.forward(x).sum());
        assert!(report.max_abs_err < 1e-8, "exact GELU gradient: {report}");
        // Φ(0.7) from a table of the normal distribution: 0.758036347776927.
        let g = Gelu.forward(dev.tensor([0.7f64])).array()[0];
        assert!((g - 0.7 * 0.758_036_347_776_927).abs() < 1e-12);
    }

    #[test]
    fn quick_gelu_matches_its_formula_and_gradient() {
        both_paths(|_| quick_gelu());
    }

    fn quick_gelu() {
        let dev = Cpu::default();
        let xs = [-4.0f64, -1.3, -0.2, 0.0, 0.4, 1.0, 2.5];
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        close(
            &QuickGelu.forward(dev.tensor(xs)).array(),
            &xs.map(|v| v * sig(1.702 * v)),
        );
        let report = check_input_grads(&dev.tensor(xs), |x| QuickGelu.forward(x).sum());
        assert!(report.max_abs_err < 1e-8, "QuickGelu gradient: {report}");
        // f32, and far out where glibc's `expf` takes its slow path.
        let y = QuickGelu.forward(dev.tensor([1.0f32])).array()[0];
        let far = QuickGelu.forward(dev.tensor([-300.0f32, 300.0])).array();
        assert!(far[0].abs() < 1e-30 && far[1] == 300.0, "{far:?}");
        assert!((f64::from(y) - sig(1.702)).abs() < 1e-6);
        assert_eq!(QuickGelu::PARAMS, 0);
    }

    /// `f16` and `bf16` through the fused kernels: every value is the `f64` function of its
    /// (half) input rounded once, to within one spacing of the type (`spacing`, relative, plus
    /// the f32 kernels' 1e-5), and so is every gradient of `Σ y`; 70,000 inputs, so that
    /// several blocks run.
    fn half_kernels_round_once<H: Dtype + num_traits::Float>(spacing: f64)
    where
        Cpu: Device<H>,
    {
        let dev = Cpu::default();
        let n = 70_000;
        let xs: Vec<H> = (0..n)
            .map(|i| H::from_f64(-7.0 + 14.0 * i as f64 / (n - 1) as f64).unwrap())
            .collect();
        type Pair = (fn(f64) -> f64, fn(f64) -> f64);
        let cases: [(&str, Pair); 5] = [
            (
                "relu",
                (|v| v.max(0.0), |v| if v > 0.0 { 1.0 } else { 0.0 }),
            ),
            (
                "gelu",
                (
                    |v| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt())),
                    |v| {
                        0.5 * (1.0 + libm::erf(v / 2f64.sqrt()))
                            + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt()
                    },
                ),
            ),
            (
                "gelu_tanh",
                (
                    |v| {
                        let c = (2.0 / std::f64::consts::PI).sqrt();
                        0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
                    },
                    |v| {
                        let c = (2.0 / std::f64::consts::PI).sqrt();
                        let t = (c * (v + 0.044715 * v * v * v)).tanh();
                        0.5 * (1.0 + t)
                            + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * v * v)
                    },
                ),
            ),
            (
                "silu",
                (
                    |v| v / (1.0 + (-v).exp()),
                    |v| {
                        let s = 1.0 / (1.0 + (-v).exp());
                        s * (1.0 + v * (1.0 - s))
                    },
                ),
            ),
            (
                "quick_gelu",
                (
                    |v| v / (1.0 + (-1.702 * v).exp()),
                    |v| {
                        let s = 1.0 / (1.0 + (-1.702 * v).exp());
                        s * (1.0 + 1.702 * v * (1.0 - s))
                    },
                ),
            ),
        ];
        for (name, (f, df)) in cases {
            let x = dev.tensor_from_vec(xs.clone(), (n,));
            let y = match name {
                "gelu" => Gelu.forward(x.leaky_trace()),
                "gelu_tanh" => GeluTanh.forward(x.leaky_trace()),
                "silu" => SiLU.forward(x.leaky_trace()),
                "relu" => ReLU.forward(x.leaky_trace()),
                _ => QuickGelu.forward(x.leaky_trace()),
            };
            let values = y.as_vec();
            let grads = y.sum().backward().get(&x).as_vec();
            for ((x, y), g) in xs.iter().zip(&values).zip(&grads) {
                let v = x.to_f64().unwrap();
                for (what, got, want) in [("value", y, f(v)), ("gradient", g, df(v))] {
                    let got = got.to_f64().unwrap();
                    // 1e-5 absolute: the f32 kernels' own error where a value or gradient
                    // vanishes (tanh GELU's 1 - t² is 0 in f32 left of -5, 1e-6 exactly).
                    assert!(
                        (got - want).abs() <= spacing * want.abs() + 1e-5,
                        "{name} {what} at {v}: {got}, the exact {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn half_kernels_compute_in_f32_and_round_once() {
        half_kernels_round_once::<half::f16>(2f64.powi(-10));
        half_kernels_round_once::<half::bf16>(2f64.powi(-7));
    }

    type Taped<S> = Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>>;

    /// The activation called `name` in `fused_cpu.json`, on a taped tensor.
    fn by_name<S: Shape>(name: &str, x: Taped<S>) -> Taped<S> {
        match name {
            "softmax" => Softmax.forward(x),
            "log_softmax" => LogSoftmax.forward(x),
            "gelu" => Gelu.forward(x),
            "gelu_tanh" => GeluTanh.forward(x),
            "silu" => SiLU.forward(x),
            "relu" => ReLU.forward(x),
            _ => unreachable!("{name}"),
        }
    }

    const FUSED: [&str; 6] = [
        "softmax",
        "log_softmax",
        "gelu",
        "gelu_tanh",
        "silu",
        "relu",
    ];

    #[test]
    fn fused_activations_match_pytorch() {
        let dev = Cpu::default();
        for name in FUSED {
            let c = case(name);
            let x = dev.tensor_from_vec(floats(&c, "x"), (3usize, Const::<6>));
            both_paths(|path| {
                let at = |what: &str| format!("{name}, {path}: {what}");
                let y = by_name(name, x.leaky_trace());
                assert_close(&at("forward"), &y.as_vec(), &floats(&c, "y"), 1e-12);
                let g = dev.tensor_from_vec(floats(&c, "g"), *y.shape());
                let grads = (y * g).sum::<Rank0, _>().backward();
                let gx = grads.get(&x).as_vec();
                assert_close(&at("grad x"), &gx, &floats(&c, "grad_x"), 1e-12);
            });
        }
    }

    #[test]
    fn fused_gradients_match_central_differences() {
        let dev = Cpu::seed_from_u64(3);
        let x: Tensor<Rank3<2, 3, 5>, f64, Cpu> = dev.sample_normal::<Rank3<2, 3, 5>>() * 2.0;
        for name in FUSED {
            both_paths(|path| {
                let report = check_input_grads(&x, |x| {
                    let y = by_name(name, x);
                    (y.with_empty_tape().square() + y.sin()).sum::<Rank0, _>()
                });
                assert!(report.max_abs_err <= 1e-6, "{name}, {path}: {report}");
                eprintln!("{name}, {path}: {report}");
            });
        }
    }

    #[test]
    fn fused_kernels_agree_with_the_compositions_on_many_rows() {
        // 3·200·70 elements: several rayon tasks, and rows that straddle no task boundary.
        let dev = Cpu::seed_from_u64(8);
        let x: Tensor<Rank3<3, 200, 70>, f64, Cpu> = dev.sample_normal::<Rank3<3, 200, 70>>() * 3.0;
        let g: Tensor<Rank3<3, 200, 70>, f64, Cpu> = dev.sample_normal();
        for name in FUSED {
            let run = || {
                let y = by_name(name, x.leaky_trace());
                let value = y.as_vec();
                let grads = (y * g.clone()).sum::<Rank0, _>().backward();
                (value, grads.get(&x).as_vec())
            };
            let (fused, composed) = (run(), composition_only(run));
            assert_close(&format!("{name}: forward"), &fused.0, &composed.0, 1e-12);
            assert_close(&format!("{name}: grad x"), &fused.1, &composed.1, 1e-12);
        }
    }

    #[test]
    fn f32_kernels_and_strided_inputs() {
        let dev = Cpu::seed_from_u64(9);
        let base: Tensor<Rank2<4, 3>, f32, Cpu> = dev.sample_normal();
        let t = || base.clone().permute::<Rank2<3, 4>, _>();
        let dense = dev.tensor_from_vec(t().as_vec(), (Const::<3>, Const::<4>));
        let y = |x| Softmax.forward(x);
        assert_eq!(y(t()).as_vec(), y(dense.clone()).as_vec());
        let wide = dense.clone() * 3.0;
        let g: Tensor<Rank2<3, 4>, f32, Cpu> = dev.sample_normal();
        for name in FUSED {
            let run = || {
                let x = wide.leaky_trace();
                let y = match name {
                    "softmax" => Softmax.forward(x),
                    "log_softmax" => LogSoftmax.forward(x),
                    "gelu" => Gelu.forward(x),
                    "gelu_tanh" => GeluTanh.forward(x),
                    "silu" => SiLU.forward(x),
                    _ => ReLU.forward(x),
                };
                let value = y.as_vec();
                let grads = (y * g.clone()).sum::<Rank0, _>().backward();
                [value, grads.get(&wide).as_vec()]
            };
            let (fused, composed) = (run(), composition_only(run));
            for (what, (f, c)) in ["forward", "grad x"]
                .iter()
                .zip(fused.iter().zip(&composed))
            {
                for (a, b) in f.iter().zip(c) {
                    let tol = 2e-6 * b.abs().max(1.0);
                    assert!((a - b).abs() <= tol, "f32 {name} {what}: {f:?} vs {c:?}");
                }
            }
        }
        let b64 = base.to_dtype::<f64>();
        let report = check_input_grads(&b64, |b| {
            LogSoftmax
                .forward(b.permute::<Rank2<3, 4>, _>())
                .square()
                .sum::<Rank0, _>()
        });
        assert!(
            report.max_abs_err <= 1e-6,
            "transposed log-softmax: {report}"
        );
    }

    /// NaN in, NaN out, and the gradient passes through it, in every type the fused kernel
    /// takes, as in PyTorch (`torch.relu` on `[nan, -1, 0, 2]` gives `[nan, 0, 0, 2]`, and the
    /// gradient of `3·Σ y` is `[3, 0, 0, 3]`).
    #[test]
    fn relu_keeps_nan_as_pytorch_does() {
        fn check<H: Dtype + num_traits::Float>()
        where
            Cpu: Device<H>,
        {
            let dev = Cpu::default();
            let v = |x: f64| H::from_f64(x).unwrap();
            let x = dev.tensor([v(f64::NAN), v(-1.0), v(0.0), v(2.0)]);
            let y = ReLU.forward(x.leaky_trace());
            let values = y.array();
            let g = (y * v(3.0)).sum::<Rank0, _>().backward().get(&x).array();
            let name = std::any::type_name::<H>();
            assert!(values[0].is_nan(), "{name}: relu(NaN) = {:?}", values[0]);
            let rest: Vec<f64> = values[1..].iter().map(|y| y.to_f64().unwrap()).collect();
            assert_eq!(rest, [0.0, 0.0, 2.0], "{name}");
            let g: Vec<f64> = g.iter().map(|g| g.to_f64().unwrap()).collect();
            assert_eq!(g, [3.0, 0.0, 0.0, 3.0], "{name}");
        }
        check::<f32>();
        check::<f64>();
        check::<half::f16>();
        check::<half::bf16>();
    }

    #[test]
    fn params_are_zero() {
        assert_eq!(Softmax::PARAMS + LogSoftmax::PARAMS + Gelu::PARAMS, 0);
        assert_eq!(GeluTanh::PARAMS + SiLU::PARAMS + ReLU::PARAMS, 0);
    }
}
