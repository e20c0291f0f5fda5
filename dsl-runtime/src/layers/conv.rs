//! Two-dimensional convolution over NCHW images, built from dfdx ops (im2col).
//!
//! dfdx 0.13 has convolutions only on nightly, so the layer is written here: the windows of the
//! input are gathered into columns (im2col), then multiplied by the weight with one batched
//! `matmul` (a batch of groups). On the CPU in `f32`/`f64` the whole layer is one op
//! (`conv_cpu`), one batch entry per task: that entry's columns, multiplied through `faer`
//! straight into its NCHW output, or for a stride-1 kernel on enough channels no columns at
//! all, one product per kernel tap on the zero-padded input (`Shifted`). The gathering,
//! [`gather_windows`], is dfdx's `gather` on other devices (it has a backward pass and a CUDA
//! kernel) and a fused loop on the CPU; it and the window arithmetic at the top are shared with
//! the pooling layers and the patch embedding.

use super::cast;
use super::cpu_fast::{
    as_f, block, cpu_vec, filled, for_chunks_with, fused_cpu, fused_stored, read, stored_call,
    take_param, Stored, CPU,
};
use super::linear::Gemm;
use super::LayerInfo;
use crate::{Elem, Error};
use dfdx::nn::{
    BuildModule, BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection,
    TensorOptions,
};
use dfdx::shapes::{Axes3, Axes4, Axis, Const, ConstDim, Dim, Dtype, HasShape, Rank1, Shape};
use dfdx::tensor::{HasErr, PutTape, SplitTape, Storage, Tape, Tensor};
use dfdx::tensor_ops::{
    BroadcastTo, Device, GatherTo, PermuteTo, ReshapeTo, TryAdd, TryConcatAlong, TryMatMul,
};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand_distr::Uniform;
use rayon::prelude::*;
use std::any::Any;
use std::marker::PhantomData;

/// A sliding window along one axis: kernel size, stride, padding on each side, dilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub dil: usize,
}

impl Window {
    /// How far the kernel reaches: `DIL·(K−1) + 1`.
    fn span(self) -> usize {
        self.dil * (self.k - 1) + 1
    }

    /// `(n + 2·P − DIL·(K−1) − 1) / S + 1`, or `None` when the kernel does not fit.
    pub fn out(self, n: usize) -> Option<usize> {
        (n + 2 * self.p)
            .checked_sub(self.span())
            .map(|rest| rest / self.s + 1)
    }

    /// The input position under tap `t` of output `o`, or `None` in the padding.
    #[inline]
    pub fn source(self, o: usize, t: usize, n: usize) -> Option<usize> {
        (o * self.s + t * self.dil)
            .checked_sub(self.p)
            .filter(|&i| i < n)
    }

    /// The output size along an axis of input size `n`, as the dimension type `O`; a kernel
    /// that does not fit, or a declared size that differs, is an [`Error::Shape`] naming
    /// `layer` and the rule.
    pub fn out_dim<O: Dim>(self, layer: &str, axis: &str, n: usize) -> Result<O, Error> {
        const RULE: &str = "out = (in + 2·padding − dilation·(kernel − 1) − 1) / stride + 1";
        let Some(out) = self.out(n) else {
            return Err(Error::Shape(format!(
                "{layer}: the input {axis} {n}, padded by {} on each side, is {}, smaller than \
                 the kernel's reach {} ({RULE}); give it an input {axis} of at least {} or more \
                 padding",
                self.p,
                n + 2 * self.p,
                self.span(),
                self.span().saturating_sub(2 * self.p).max(1),
            )));
        };
        O::from_size(out).ok_or_else(|| {
            Error::Shape(format!(
                "{layer}: an input {axis} of {n} gives an output {axis} of {out} ({RULE}), but \
                 the layer was declared with output {axis} `{}`; give it the input size the \
                 model was declared for, or declare that size `usize` to accept any",
                short_type_name::<O>()
            ))
        })
    }
}

/// A type's name without module paths: `dfdx::shapes::shape::Const<14>` as `Const<14>`.
pub(super) fn short_type_name<T>() -> String {
    let mut rest = std::any::type_name::<T>();
    let mut out = String::new();
    while let Some(i) = rest.find("::") {
        let before = &rest[..i];
        let keep = before
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |j| j + 1);
        out.push_str(&before[..keep]);
        rest = &rest[i + 2..];
    }
    out.push_str(rest);
    out
}

/// Which input element each output element of an im2col step reads, in output order: every
/// layer of the family describes its layout with one of these, and [`gather_windows`] runs it.
pub(super) trait Taps: Copy + Send + Sync + 'static {
    /// Elements of the input; an index equal to it is a tap in the padding.
    fn src_len(&self) -> usize;
    /// Elements of the output.
    fn len(&self) -> usize;
    /// Calls `f` with the source index of every output element, in order.
    fn for_each(&self, f: impl FnMut(usize));
}

/// The taps of one example, repeated over a batch of `b` with the batch outermost.
#[derive(Debug, Clone, Copy)]
struct Batched<Tp> {
    taps: Tp,
    b: usize,
}

impl<Tp: Taps> Taps for Batched<Tp> {
    fn src_len(&self) -> usize {
        self.b * self.taps.src_len()
    }
    fn len(&self) -> usize {
        self.b * self.taps.len()
    }
    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize)) {
        let (n, pad) = (self.taps.src_len(), self.src_len());
        for base in (0..self.b).map(|bi| bi * n) {
            self.taps
                .for_each(|i| f(if i < n { base + i } else { pad }));
        }
    }
}

/// A zero output of `shape` carrying `x`'s tape, for an input with no elements (an empty
/// batch): dfdx's CPU kernels index into empty tensors and panic.
pub(super) fn empty_output<S: Shape, S2: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
    shape: S2,
) -> Result<Tensor<S2, E, D, T>, D::Err> {
    let (x, tape) = x.split_tape();
    Ok(x.device().try_zeros_like(&shape)?.put_tape(tape))
}

/// The taps of each example of a batch, one row per example.
pub(super) type Rows<B, E, D, T> = Tensor<(B, usize), E, D, T>;

/// The im2col step of every layer in this family: for each example of `x` (`[B, ...]`, `b` its
/// batch dimension), output element `e` is the input element at tap `e` of `taps` (which
/// describe one example), or `pad` where that tap lies in the padding (`pad` is `None` when
/// none does). The gradient is scattered back into `x`.
///
/// On other devices this is dfdx's `gather` (which has a CUDA kernel), after appending `pad` to
/// every example, with an index of `taps.len()` entries built on the host each call and
/// broadcast over the batch (so it does not grow with the batch). On the CPU it is a fused
/// loop through dfdx's public tape API, which recomputes the taps in the backward pass instead
/// of storing an index: dfdx's CPU gather walks an n-d index per element. Measured on
/// `Conv2d<16, 32, 3, 1, 1>` over `[8, 16, 28, 28]` by the layer's timing test.
pub(super) fn gather_windows<S: Shape, B: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>, Tp: Taps>(
    x: Tensor<S, E, D, T>,
    b: B,
    taps: Tp,
    pad: Option<E>,
) -> Result<Rows<B, E, D, T>, D::Err> {
    let (n, m) = (taps.src_len(), taps.len());
    if fused_cpu::<E, D>() {
        let batched = Batched { taps, b: b.size() };
        let flat = x.try_reshape_like(&(batched.src_len(),))?;
        return gather_flat_cpu(flat, batched, pad.unwrap_or_default())?.try_reshape_like(&(b, m));
    }
    let x = x.try_reshape_like(&(b, n))?;
    let x = match pad {
        None => x,
        Some(v) => {
            let pad = x
                .device()
                .try_tensor_from_vec(vec![v; b.size()], (b, 1usize))?;
            (x, pad).try_concat_along(Axis::<1>)?
        }
    };
    let mut idx = Vec::with_capacity(m);
    taps.for_each(|i| idx.push(i));
    let idx = x
        .device()
        .try_tensor_from_vec(idx, (m,))?
        .try_broadcast_like::<_, Axis<0>>(&(b, m))?;
    x.try_gather::<(B, usize), _>(idx)
}

/// `out[e] = src[tap e]` (or `pad`) over a flat input, and its scatter-add backward: the CPU
/// fast path of [`gather_windows`], and of the convolution's batch-interleaved columns.
fn gather_flat_cpu<E: Dtype, D: Device<E>, T: Tape<E, D>, Tp: Taps>(
    src: Tensor<(usize,), E, D, T>,
    taps: Tp,
    pad: E,
) -> Result<Tensor<(usize,), E, D, T>, D::Err> {
    let (src, mut tape) = src.split_tape();
    let mut values = filled(taps.src_len(), E::default());
    src.copy_into(&mut values);
    let mut out = Vec::with_capacity(taps.len());
    taps.for_each(|i| out.push(values.get(i).copied().unwrap_or(pad)));
    drop(values);
    let out = src.device().try_tensor_from_vec(out, (taps.len(),))?;
    if T::OWNS_TAPE {
        let (src, out_ghost) = (src.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            // Both buffers are needed at once, and the public API lends one at a time: borrow
            // the output's gradient out of its slot and put it back afterwards.
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            let g_src = cpu_vec::<E, D>(grads.get_or_alloc_mut(&src)?).expect(CPU);
            let mut g = g_out.iter();
            taps.for_each(|i| {
                let ge = *g.next().expect("one gradient per tap");
                if let Some(s) = g_src.get_mut(i) {
                    *s += ge;
                }
            });
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// The compile-time size `C / G`: the input channels of one group of a grouped convolution,
/// the second dimension of its weight.
///
/// Stable Rust cannot write `Const<{ C / G }>`; this dimension has the same size and is a
/// [`ConstDim`], so the weight keeps a fully static shape (and can be saved, loaded and
/// optimised like any other parameter).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PerGroup<const C: usize, const G: usize>;

impl<const C: usize, const G: usize> Dim for PerGroup<C, G> {
    #[inline(always)]
    fn size(&self) -> usize {
        C / G
    }
    #[inline(always)]
    fn from_size(size: usize) -> Option<Self> {
        (size == C / G).then_some(PerGroup)
    }
}

impl<const C: usize, const G: usize> ConstDim for PerGroup<C, G> {
    const SIZE: usize = C / G;
}

/// A 2-d convolution over NCHW images: `CI` input and `CO` output channels, a `K`×`K` kernel,
/// stride `S`, zero padding `P` on every side, dilation `DIL`, `G` groups, a bias if `BIAS`.
///
/// With `g = ⌊o / (CO/G)⌋` the group of output channel `o`,
/// `y[b, o, i, j] = bias[o] + Σ_{c < CI/G} Σ_{u, v < K} weight[o, c, u, v] ·
/// x[b, g·CI/G + c, S·i + DIL·u − P, S·j + DIL·v − P]`, reading zero outside the image.
///
/// # Shapes
/// `[B, CI, H, W] -> [B, CO, OH, OW]` with `OH = (H + 2·P − DIL·(K−1) − 1) / S + 1` and
/// likewise `OW`. `OH` and `OW` are dfdx dimension types: `usize` (any size, the default) or
/// `Const<n>`, which `model!` writes in when it can compute the size; a runtime input whose
/// output size differs from a declared `Const<n>`, or that is smaller than the kernel's reach,
/// is an [`Error::Shape`].
///
/// Parameters: `weight` `[CO, CI/G, K, K]` (its second dimension is [`PerGroup<CI, G>`]) and,
/// if `BIAS`, `bias` `[CO]`, both initialised uniformly in `±1/√(CI/G·K·K)` as in PyTorch.
/// `G` must divide `CI` and `CO`, and `K`, `S`, `DIL` must be at least 1; both are checked at
/// compile time.
///
/// PyTorch: `torch.nn.Conv2d(CI, CO, K, stride=S, padding=P, dilation=DIL, groups=G,
/// bias=BIAS)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// // 3 → 8 channels, 3×3 kernel, stride 2, padding 1; the output size is computed at run time.
/// let conv = dev.build_module::<Conv2d<3, 8, 3, 2, 1>, f32>();
/// let x: Tensor<(usize, Const<3>, usize, usize), f32, _> = dev.zeros_like(&(2, Const, 28, 28));
/// let y = conv.try_forward(x)?;
/// assert_eq!(y.shape(), &(2, Const::<8>, 14, 14));
/// // The same layer with its output size in the type.
/// let conv = dev.build_module::<Conv2d<3, 8, 3, 2, 1, 1, 1, true, Const<14>, Const<14>>, f32>();
/// let y: Tensor<Rank4<2, 8, 14, 14>, f32, _> = conv.try_forward(dev.zeros::<Rank4<2, 3, 28, 28>>())?;
/// # Ok::<(), neural_arch::Error>(())
/// ```
///
/// Groups that do not divide the channels are a compile error ("evaluation panicked: Conv2d:
/// the groups G must divide the input channels CI"):
///
/// ```compile_fail
/// use neural_arch::prelude::*;
/// let conv = Cpu::default().build_module::<Conv2d<3, 4, 3, 1, 0, 1, 2>, f32>();
/// ```
pub struct Conv2d<
    const CI: usize,
    const CO: usize,
    const K: usize,
    const S: usize = 1,
    const P: usize = 0,
    const DIL: usize = 1,
    const G: usize = 1,
    const BIAS: bool = true,
    OH = usize,
    OW = usize,
>(PhantomData<(OH, OW)>);

macro_rules! zero_sized_builder_traits {
    ($name:ident [$($c:ident: $t:ty),*] [$($d:ident),*]) => {
        impl<$(const $c: $t,)* $($d,)*> Default for $name<$($c,)* $($d,)*> {
            fn default() -> Self {
                $name(PhantomData)
            }
        }
        impl<$(const $c: $t,)* $($d,)*> Clone for $name<$($c,)* $($d,)*> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<$(const $c: $t,)* $($d,)*> Copy for $name<$($c,)* $($d,)*> {}
        impl<$(const $c: $t,)* $($d,)*> PartialEq for $name<$($c,)* $($d,)*> {
            fn eq(&self, _: &Self) -> bool {
                true
            }
        }
        impl<$(const $c: $t,)* $($d,)*> Eq for $name<$($c,)* $($d,)*> {}
        impl<$(const $c: $t,)* $($d,)*> std::fmt::Debug for $name<$($c,)* $($d,)*> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&super::conv::short_type_name::<Self>())
            }
        }
    };
}
pub(super) use zero_sized_builder_traits;

zero_sized_builder_traits!(Conv2d [CI: usize, CO: usize, K: usize, S: usize, P: usize, DIL: usize, G: usize, BIAS: bool] [OH, OW]);

impl<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
        OH,
        OW,
    > Conv2d<CI, CO, K, S, P, DIL, G, BIAS, OH, OW>
{
    /// The compile-time rules of the layer; evaluated when the layer is built or run.
    pub const CHECK: () = {
        assert!(K >= 1, "Conv2d needs a kernel size K of at least 1");
        assert!(S >= 1, "Conv2d needs a stride S of at least 1");
        assert!(DIL >= 1, "Conv2d needs a dilation DIL of at least 1");
        assert!(
            G >= 1,
            "Conv2d needs at least one group (G = 1 is an ordinary convolution)"
        );
        assert!(
            CI.is_multiple_of(G),
            "Conv2d: the groups G must divide the input channels CI"
        );
        assert!(
            CO.is_multiple_of(G),
            "Conv2d: the groups G must divide the output channels CO"
        );
    };

    /// `Conv2d<3, 8, 3> (stride 2, padding 1, dilation 1, groups 1)`, for messages.
    fn describe() -> String {
        format!("Conv2d<{CI}, {CO}, {K}> (stride {S}, padding {P}, dilation {DIL}, groups {G})")
    }
}

/// The built [`Conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2dModule<
    const CI: usize,
    const CO: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
    const G: usize,
    const BIAS: bool,
    OH,
    OW,
    E: Dtype,
    D: Storage<E>,
> {
    /// `[CO, CI/G, K, K]`: output channel, input channel within the group, kernel row, column.
    pub weight: Tensor<(Const<CO>, PerGroup<CI, G>, Const<K>, Const<K>), E, D>,
    /// `[CO]`; `Some` exactly when `BIAS` (the parameter traversal relies on it).
    pub bias: Option<Tensor<Rank1<CO>, E, D>>,
    out: PhantomData<(OH, OW)>,
}

impl<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
        OH,
        OW,
    > LayerInfo for Conv2d<CI, CO, K, S, P, DIL, G, BIAS, OH, OW>
{
    const PARAMS: usize = {
        #[allow(clippy::let_unit_value)]
        let () = Self::CHECK;
        CO * (CI / G) * K * K + if BIAS { CO } else { 0 }
    };
}

impl<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
        OH: Dim,
        OW: Dim,
        E: Elem,
        D: Device<E>,
    > BuildOnDevice<D, E> for Conv2d<CI, CO, K, S, P, DIL, G, BIAS, OH, OW>
{
    type Built = Conv2dModule<CI, CO, K, S, P, DIL, G, BIAS, OH, OW, E, D>;

    fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
        #[allow(clippy::let_unit_value)]
        let () = Self::CHECK;
        Self::Built::try_build(device)
    }
}

impl<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
        OH,
        OW,
        E: Dtype,
        D: Storage<E>,
    > NonMutableModule for Conv2dModule<CI, CO, K, S, P, DIL, G, BIAS, OH, OW, E, D>
{
}

/// PyTorch's default bound for a convolution's parameters: `1/√fan_in`, `fan_in = CI/G·K·K`
/// (kaiming-uniform with `a = √5` reduces to it).
fn init_bound<E: Elem>(fan_in: usize) -> E {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    E::from_f64(b).unwrap_or_else(E::one)
}

impl<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
        OH: Dim,
        OW: Dim,
        E: Elem,
        D: Device<E>,
    > TensorCollection<E, D> for Conv2dModule<CI, CO, K, S, P, DIL, G, BIAS, OH, OW, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> =
        Conv2dModule<CI, CO, K, S, P, DIL, G, BIAS, OH, OW, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        #[allow(clippy::let_unit_value)]
        let () = Conv2d::<CI, CO, K, S, P, DIL, G, BIAS, OH, OW>::CHECK;
        let weight = Self::tensor(
            "weight",
            |s| &s.weight,
            |s| &mut s.weight,
            TensorOptions::reset_with(|t| {
                let b = init_bound::<E>(CI / G * K * K);
                t.try_fill_with_distr(Uniform::new(-b, b))
            }),
        );
        // A convolution without bias has no `bias` key at all, as in PyTorch's state dict.
        if BIAS {
            let bias = Self::tensor(
                "bias",
                |s| {
                    s.bias
                        .as_ref()
                        .expect("a Conv2d with BIAS = true holds a bias")
                },
                |s| {
                    s.bias
                        .as_mut()
                        .expect("a Conv2d with BIAS = true holds a bias")
                },
                TensorOptions::reset_with(|t| {
                    let b = init_bound::<E>(CI / G * K * K);
                    t.try_fill_with_distr(Uniform::new(-b, b))
                }),
            );
            visitor.visit_fields((weight, bias), |(weight, bias)| Conv2dModule {
                weight,
                bias: Some(bias),
                out: PhantomData,
            })
        } else {
            visitor.visit_fields(weight, |weight| Conv2dModule {
                weight,
                bias: None,
                out: PhantomData,
            })
        }
    }
}

/// The columns of a convolution: rows `(c, u, v)` (input channel, kernel row, kernel column),
/// columns `(b, i, j)` (example, output row, output column), so that the rows of group `g` are
/// the contiguous block `g·CI/G·K·K ..` and the whole batch is one wide matrix.
#[derive(Debug, Clone, Copy)]
struct ConvColumns {
    /// Input `[B, C, H, W]`.
    input: (usize, usize, usize, usize),
    /// Output `[OH, OW]`.
    out: (usize, usize),
    win: Window,
}

impl Taps for ConvColumns {
    fn src_len(&self) -> usize {
        let (b, c, h, w) = self.input;
        b * c * h * w
    }
    fn len(&self) -> usize {
        let (b, c, _, _) = self.input;
        c * self.win.k * self.win.k * b * self.out.0 * self.out.1
    }
    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize)) {
        let ((b, c, h, w), (oh, ow), win) = (self.input, self.out, self.win);
        let pad = self.src_len();
        // Column offsets of one kernel column, `pad` in the padding: the same for every row.
        let mut cols = vec![pad; ow];
        for ch in 0..c {
            for u in 0..win.k {
                for v in 0..win.k {
                    for (j, col) in cols.iter_mut().enumerate() {
                        *col = win.source(j, v, w).unwrap_or(pad);
                    }
                    for bi in 0..b {
                        let image = (bi * c + ch) * h * w;
                        for i in 0..oh {
                            match win.source(i, u, h) {
                                Some(y) => {
                                    let row = image + y * w;
                                    for &x in &cols {
                                        f(if x == pad { pad } else { row + x });
                                    }
                                }
                                None => (0..ow).for_each(|_| f(pad)),
                            }
                        }
                    }
                }
            }
        }
    }
}

impl ConvColumns {
    /// For kernel column `v`, the output columns `lo..hi` whose sources are inside the input
    /// (the others are in the padding), and the source of `lo`: output column `lo + j` reads
    /// input column `x0 + j·S`, one contiguous copy per output row for stride 1.
    fn run(&self, v: usize) -> (usize, usize, usize) {
        let (w, ow, win) = (self.input.3, self.out.1, self.win);
        // Output column `j` reads `j·S + v·DIL − P`: inside from `j·S ≥ P − v·DIL` to
        // `j·S < W + P − v·DIL`.
        let reach = v * win.dil;
        let lo = win.p.saturating_sub(reach).div_ceil(win.s).min(ow);
        let hi = (w + win.p)
            .saturating_sub(reach)
            .div_ceil(win.s)
            .clamp(lo, ow);
        (lo, hi, (lo * win.s + reach).saturating_sub(win.p))
    }

    /// Whether the columns are the input itself: a 1×1 kernel with stride 1 and no padding.
    fn identity(&self) -> bool {
        self.win.k == 1 && self.win.s == 1 && self.win.p == 0
    }

    /// Entry `bi`'s columns `[C·K·K, OH·OW]`, for a one-entry `self` over the batch `xs`: the
    /// entry's own images when [`Self::identity`] (no copy), else written into `scratch`.
    fn entry<'a, E: Dtype>(&self, xs: &'a [E], bi: usize, scratch: &'a mut Vec<E>) -> &'a [E] {
        let ((_, c, h, w), (oh, ow), k) = (self.input, self.out, self.win.k);
        let image = &xs[bi * c * h * w..][..c * h * w];
        if self.identity() {
            return image;
        }
        let l = oh * ow;
        scratch.resize(c * k * k * l, E::default());
        for (r, row) in scratch.chunks_exact_mut(l).enumerate() {
            self.fill_row(image, (r / (k * k), r / k % k, r % k), row);
        }
        scratch
    }

    /// Row `(ch, u, v)` of the columns (`B·OH·OW` long) from the input `src`.
    fn fill_row<E: Dtype>(&self, src: &[E], (ch, u, v): (usize, usize, usize), row: &mut [E]) {
        let ((_, c, h, w), (oh, ow), s) = (self.input, self.out, self.win.s);
        let (lo, hi, x0) = self.run(v);
        for (bi, image) in row.chunks_exact_mut(oh * ow).enumerate() {
            let plane = &src[(bi * c + ch) * h * w..][..h * w];
            for (i, dst) in image.chunks_exact_mut(ow).enumerate() {
                let Some(y) = self.win.source(i, u, h) else {
                    dst.fill(E::default());
                    continue;
                };
                let line = &plane[y * w..][..w];
                dst[..lo].fill(E::default());
                // With no valid column, `x0` may lie past the row.
                if lo < hi {
                    if s == 1 {
                        dst[lo..hi].copy_from_slice(&line[x0..x0 + hi - lo]);
                    } else {
                        let src = line[x0..].iter().step_by(s);
                        dst[lo..hi].iter_mut().zip(src).for_each(|(d, &x)| *d = x);
                    }
                }
                dst[hi..].fill(E::default());
            }
        }
    }

    /// Adds the gradient of the columns of channel `ch` (`K·K` rows of `g`, from row
    /// `ch·K·K`) into that channel's images, returned as `[B, H, W]`.
    fn channel_grad<E: Dtype>(&self, g: &[E], ch: usize) -> Vec<E> {
        let (b, _, h, w) = self.input;
        let mut acc = vec![E::default(); b * h * w];
        self.add_channel_grad(g, ch, &mut acc);
        acc
    }

    /// [`Self::channel_grad`] added into `acc`, that channel's images `[B, H, W]`.
    fn add_channel_grad<E: Dtype>(&self, g: &[E], ch: usize, acc: &mut [E]) {
        let ((_, _, h, w), (oh, ow), k) = (self.input, self.out, self.win.k);
        let len = self.input.0 * oh * ow;
        for u in 0..k {
            for v in 0..k {
                let row = &g[((ch * k + u) * k + v) * len..][..len];
                let (lo, hi, x0) = self.run(v);
                if lo == hi {
                    continue;
                }
                for (image, acc) in row.chunks_exact(oh * ow).zip(acc.chunks_exact_mut(h * w)) {
                    for (i, gs) in image.chunks_exact(ow).enumerate() {
                        let Some(y) = self.win.source(i, u, h) else {
                            continue;
                        };
                        let line = acc[y * w..][..w][x0..].iter_mut().step_by(self.win.s);
                        for (a, g) in line.zip(&gs[lo..hi]) {
                            *a += *g;
                        }
                    }
                }
            }
        }
    }
}

/// A stride-1 convolution as `K²` products on the zero-padded input, no columns: for kernel
/// tap `(u, v)`, `Y[o, i, j] += Σ_c W[o, c, u, v] · Xp[c, i + u·dil, j + v·dil]`. With the
/// output laid out on the padded width `Wp` ("wide": output row `i` at `i·Wp`, its first `OW`
/// columns valid), the input that tap reads is the padded input itself shifted by
/// `(u·Wp + v)·dil`: a strided view, so each tap is one plain product `W_uv · Xp_shifted`
/// (`[CO, C] × [C, (OH−1)·Wp + OW]`). The backward pass runs the same views the other way
/// (`dW_uv += dY · Xp_shiftedᵀ`, `dXp_shifted += W_uvᵀ · dY`), with the wide output
/// gradient zero in the columns past `OW`, so they add nothing.
///
/// It replaces the `C·K²`-row columns (written in the forward pass, rebuilt and scattered
/// back in the backward pass, a quarter of a ResNet tiny step) by a padded copy of the input;
/// the products have `k = C` instead of `C·K²`, so it pays from a few input channels per group
/// on ([`Shifted::MIN_CHANNELS`]).
#[derive(Debug, Clone, Copy)]
struct Shifted {
    /// One entry's input `[C, H, W]`.
    c: usize,
    h: usize,
    w: usize,
    /// Padding, dilation, kernel size.
    p: usize,
    dil: usize,
    k: usize,
    /// Output `[OH, OW]`.
    oh: usize,
    ow: usize,
}

/// `rows × cols` row-major in `slice`, rows `row_stride` apart, mutable. Not faer's
/// `MatMut::from_row_major_slice_with_stride_mut`: in faer 0.24.4 it checks the row-major
/// bounds but builds the view column-major (row stride 1, column stride `row_stride`), so a
/// product into it wrote past the slice (heap corruption in this file's tests). Built here as
/// the transpose of the column-major view, which faer builds correctly.
fn strided_rows_mut<F>(
    slice: &mut [F],
    rows: usize,
    cols: usize,
    row_stride: usize,
) -> MatMut<'_, F> {
    MatMut::from_column_major_slice_with_stride_mut(slice, cols, rows, row_stride).transpose_mut()
}

impl Shifted {
    /// Input channels per group from which the shifted products are used: below it the
    /// columns' single product with `k = C·K²` is as fast (ResNet tiny's step with its
    /// 3-channel stem shifted too was no faster, five A/B rounds on one thread).
    const MIN_CHANNELS: usize = 8;

    /// The shifted form of `taps` (one entry), where it applies: stride 1, a kernel larger
    /// than 1×1, and at least [`Self::MIN_CHANNELS`] input channels per group.
    fn new(taps: &ConvColumns, groups: usize) -> Option<Self> {
        let ((_, c, h, w), (oh, ow), win) = (taps.input, taps.out, taps.win);
        (win.s == 1 && win.k > 1 && c / groups >= Self::MIN_CHANNELS).then_some(Self {
            c,
            h,
            w,
            p: win.p,
            dil: win.dil,
            k: win.k,
            oh,
            ow,
        })
    }

    /// The padded width `Wp`: the row stride of the padded input and of the wide output.
    fn wp(&self) -> usize {
        self.w + 2 * self.p
    }

    /// One padded channel, `Hp·Wp`.
    fn plane(&self) -> usize {
        (self.h + 2 * self.p) * self.wp()
    }

    /// One channel of the wide output, `OH·Wp`.
    fn wide(&self) -> usize {
        self.oh * self.wp()
    }

    /// The columns the products compute: the wide output up to its last valid column. Every
    /// shifted view of that many columns ends inside its padded channel.
    fn span(&self) -> usize {
        (self.oh - 1) * self.wp() + self.ow
    }

    /// Where tap `t` (`u·K + v`) reads the padded input.
    fn shift(&self, t: usize) -> usize {
        (t / self.k * self.wp() + t % self.k) * self.dil
    }

    /// Channels `g·cg..` of the padded input `xp` as tap `t` reads them: `[cg, span]`.
    fn view<'a, F>(&self, xp: &'a [F], g: usize, cg: usize, t: usize) -> MatRef<'a, F> {
        let at = g * cg * self.plane() + self.shift(t);
        MatRef::from_row_major_slice_with_stride(&xp[at..], cg, self.span(), self.plane())
    }

    /// [`Self::view`], mutable.
    fn view_mut<'a, F>(&self, xp: &'a mut [F], g: usize, cg: usize, t: usize) -> MatMut<'a, F> {
        let at = g * cg * self.plane() + self.shift(t);
        strided_rows_mut(&mut xp[at..], cg, self.span(), self.plane())
    }

    /// Rows `g·rows..` of a wide `[CO, OH·Wp]` buffer as the products see them: `[rows, span]`.
    fn wide_rows<'a, F>(&self, yw: &'a [F], g: usize, rows: usize) -> MatRef<'a, F> {
        let at = g * rows * self.wide();
        MatRef::from_row_major_slice_with_stride(&yw[at..], rows, self.span(), self.wide())
    }

    /// One entry's images `[C, H, W]` into `buf`, `[C, Hp, Wp]`. Only the interior is written:
    /// the borders are zero from when `buf` was first sized, for this geometry.
    fn pad<F: Copy + Default>(&self, image: &[F], buf: &mut Vec<F>) {
        let (wp, plane) = (self.wp(), self.plane());
        buf.resize(self.c * plane, F::default());
        for (src, dst) in image
            .chunks_exact(self.h * self.w)
            .zip(buf.chunks_exact_mut(plane))
        {
            for (y, row) in src.chunks_exact(self.w).enumerate() {
                dst[(y + self.p) * wp + self.p..][..self.w].copy_from_slice(row);
            }
        }
    }

    /// The weight `[CO, C/G·K·K]` as `K·K` matrices `[CO, C/G]`, one per tap.
    fn taps_of<F: Copy>(&self, ws: &[F], co: usize, cg: usize) -> Vec<F> {
        let kk = self.k * self.k;
        let mut out = Vec::with_capacity(ws.len());
        for t in 0..kk {
            for o in 0..co {
                out.extend((0..cg).map(|c| ws[(o * cg + c) * kk + t]));
            }
        }
        out
    }

    /// [`Self::taps_of`] backwards: `K·K` matrices `[CO, C/G]` added into a weight-shaped
    /// `[CO, C/G·K·K]`.
    fn add_taps<F: Copy + std::ops::AddAssign>(
        &self,
        per_tap: &[F],
        co: usize,
        cg: usize,
        acc: &mut [F],
    ) {
        let kk = self.k * self.k;
        for (t, m) in per_tap.chunks_exact(co * cg).enumerate() {
            for (i, &v) in m.iter().enumerate() {
                acc[i * kk + t] += v;
            }
        }
    }

    /// One entry's output `[CO, OH, OW]` (`y`) from its padded input `xp`, through the wide
    /// buffer `yw`; `bias` added last.
    #[allow(clippy::too_many_arguments)]
    fn forward<F: Gemm + Dtype>(
        &self,
        xp: &[F],
        wk: &[F],
        bias: Option<&[F]>,
        groups: usize,
        co: usize,
        yw: &mut Vec<F>,
        y: &mut [F],
    ) {
        let (cg, cog, wide) = (self.c / groups, co / groups, self.wide());
        yw.resize(co * wide, F::zero_impl());
        for g in 0..groups {
            for t in 0..self.k * self.k {
                let dst = &mut yw[g * cog * wide..];
                let dst = strided_rows_mut(dst, cog, self.span(), wide);
                let accum = if t == 0 { Accum::Replace } else { Accum::Add };
                let w_t = block(wk, t * groups + g, cog, cg);
                matmul(
                    dst,
                    accum,
                    w_t,
                    self.view(xp, g, cg, t),
                    F::one_impl(),
                    Par::Seq,
                );
            }
        }
        let wp = self.wp();
        for (o, (y, yw)) in y
            .chunks_exact_mut(self.oh * self.ow)
            .zip(yw.chunks_exact(wide))
            .enumerate()
        {
            let b = bias.map_or(F::zero_impl(), |b| b[o]);
            for (y, yw) in y.chunks_exact_mut(self.ow).zip(yw.chunks_exact(wp)) {
                y.iter_mut().zip(yw).for_each(|(y, &v)| *y = v + b);
            }
        }
    }

    /// One entry's backward pass: the weight's gradient per tap added into `g_wk`
    /// (`[K·K, CO, C/G]`), the input's added into `g_x` (`[C, H, W]`). `gy` is the entry's
    /// output gradient `[CO, OH, OW]`; `gyw` and `dxp` are scratch.
    #[allow(clippy::too_many_arguments)]
    fn backward<F: Gemm + Dtype>(
        &self,
        xp: &[F],
        wk: &[F],
        gy: &[F],
        groups: usize,
        co: usize,
        (gyw, dxp): (&mut Vec<F>, &mut Vec<F>),
        g_wk: &mut [F],
        g_x: &mut [F],
    ) {
        let (cg, cog, wide, wp) = (self.c / groups, co / groups, self.wide(), self.wp());
        // The output gradient on the wide layout; the columns past `OW` stay zero.
        gyw.resize(co * wide, F::zero_impl());
        for (gy, gyw) in gy
            .chunks_exact(self.oh * self.ow)
            .zip(gyw.chunks_exact_mut(wide))
        {
            for (gy, gyw) in gy.chunks_exact(self.ow).zip(gyw.chunks_exact_mut(wp)) {
                gyw[..self.ow].copy_from_slice(gy);
            }
        }
        dxp.clear();
        dxp.resize(self.c * self.plane(), F::zero_impl());
        for g in 0..groups {
            let gy_g = self.wide_rows(gyw, g, cog);
            for t in 0..self.k * self.k {
                let m = (t * groups + g) * cog * cg;
                let g_w = MatMut::from_row_major_slice_mut(&mut g_wk[m..][..cog * cg], cog, cg);
                let x_t = self.view(xp, g, cg, t);
                matmul(
                    g_w,
                    Accum::Add,
                    gy_g,
                    x_t.transpose(),
                    F::one_impl(),
                    Par::Seq,
                );
                let w_t = block(wk, t * groups + g, cog, cg);
                let dx_t = self.view_mut(dxp, g, cg, t);
                matmul(
                    dx_t,
                    Accum::Add,
                    w_t.transpose(),
                    gy_g,
                    F::one_impl(),
                    Par::Seq,
                );
            }
        }
        for (g_x, dxp) in g_x
            .chunks_exact_mut(self.h * self.w)
            .zip(dxp.chunks_exact(self.plane()))
        {
            for (y, g_x) in g_x.chunks_exact_mut(self.w).enumerate() {
                let dxp = &dxp[(y + self.p) * wp + self.p..][..self.w];
                g_x.iter_mut().zip(dxp).for_each(|(a, &v)| *a += v);
            }
        }
    }
}

/// The convolution's im2col on the CPU ([`ConvColumns`] written out): each row of the columns
/// is filled by contiguous copies of input rows (per element for strides and dilations above
/// 1), rows in parallel on rayon's pool; the backward pass scatters the columns' gradient
/// channel by channel in parallel (a channel's `K·K` rows touch only its own images). The
/// generic [`gather_flat_cpu`] visits one tap at a time on one thread: on ResNet tiny it was a
/// quarter of a training step.
fn conv_columns_cpu<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    src: Tensor<(usize,), E, D, T>,
    taps: ConvColumns,
) -> Result<Tensor<(usize,), E, D, T>, D::Err> {
    use rayon::prelude::*;
    let (src, mut tape) = src.split_tape();
    let mut values = filled(taps.src_len(), E::default());
    src.copy_into(&mut values);
    let ((b, c, h, w), (oh, ow), k) = (taps.input, taps.out, taps.win.k);
    let len = b * oh * ow;
    let mut out = filled(taps.len(), E::default());
    out.par_chunks_mut(len).enumerate().for_each(|(r, row)| {
        taps.fill_row(&values, (r / (k * k), r / k % k, r % k), row);
    });
    drop(values);
    let out = src.device().try_tensor_from_vec(out, (taps.len(),))?;
    if T::OWNS_TAPE {
        let (src, out_ghost) = (src.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            let per_channel: Vec<Vec<E>> = (0..c)
                .into_par_iter()
                .map(|ch| taps.channel_grad(&g_out, ch))
                .collect();
            let g_src = cpu_vec::<E, D>(grads.get_or_alloc_mut(&src)?).expect(CPU);
            g_src
                .par_chunks_mut(h * w)
                .enumerate()
                .for_each(|(image, g)| {
                    let (bi, ch) = (image / c, image % c);
                    let acc = &per_channel[ch][bi * h * w..][..h * w];
                    g.iter_mut().zip(acc).for_each(|(g, a)| *g += *a);
                });
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// The whole convolution on the CPU in `f32` or `f64`, or `f16` or `bf16` computed in `f32`
/// (the caller checks; see [`Stored`]), from the flat input
/// `[B, C, H, W]` to the flat output `[B, CO, OH, OW]`, one batch entry per task: its columns
/// (im2col) in a buffer of the task's, the product by the weight through `faer` straight into
/// its NCHW output, and the bias. Neither dfdx's batched `matmul` (AVX2, one group at a time)
/// nor the permute of its output into NCHW runs, and no columns of the whole batch exist: the
/// backward pass rebuilds each entry's from the saved input, which costs one more im2col and
/// saves the `C·K²`-fold larger columns (and clearing them) for every convolution. A stride-1
/// kernel on at least [`Shifted::MIN_CHANNELS`] channels per group builds no columns: see
/// [`Shifted`] (ResNet tiny's 16→16 layer, one thread: forward 5.2 → 4.5 ms, with backward
/// 20.1 → 15.5 ms).
///
/// Per batch entry `b` and group `g` (rows `CI/G·K·K`, `CO/G` outputs):
/// `Y_b = W_g · cols_b (+ bias)`. Backward from `dY_b`: `dW_g += Σ_b dY_b · cols_bᵀ` (partial
/// sums over fixed blocks of entries, added in order: the same bits on any number of threads),
/// `db += Σ dY`, and `W_gᵀ · dY_b` scattered back into entry `b`'s input gradient.
fn conv_cpu<S, F, Sw, Sb, E, D, T>(
    x: Tensor<(usize,), E, D, T>,
    weight: &Tensor<Sw, E, D>,
    bias: Option<&Tensor<Sb, E, D>>,
    taps: ConvColumns,
    groups: usize,
    co: usize,
) -> Result<Tensor<(usize,), E, D, T>, D::Err>
where
    S: Stored<F = F>,
    F: Gemm + Dtype,
    Sw: Shape,
    Sb: Shape,
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D>,
{
    let ((nb, c, h, w), (oh, ow), k) = (taps.input, taps.out, taps.win.k);
    let (l, rows, cog) = (oh * ow, c / groups * k * k, co / groups);
    // One batch entry's columns: `[C·K·K, OH·OW]`, group `g`'s rows `g·rows..`.
    let one = ConvColumns {
        input: (1, c, h, w),
        ..taps
    };
    let image = c * h * w;
    let (x, mut tape) = x.split_tape();
    // The weight and bias in the arithmetic's type (small); the input as it is stored, widened
    // for each pass.
    let (wt, ws): (_, Vec<S>) = take_param(weight, &mut tape);
    let ws = S::into_compute(ws);
    let (b, bs): (_, Option<Vec<F>>) = match bias.map(|b| take_param(b, &mut tape)) {
        Some((b, bs)) => (Some(b), Some(S::into_compute(bs))),
        None => (None, None),
    };
    let xs: Vec<S> = read(&x);
    let mut out = filled(nb * co * l, F::zero_impl());
    let xf = S::compute(&xs);
    let shifted = Shifted::new(&one, groups);
    let wk = shifted.map(|sh| sh.taps_of(&ws, co, c / groups));
    // One columns (or padded input) buffer per task, not per entry: a fresh one is zeroed (or
    // faulted in) first.
    let scratch = || (Vec::new(), Vec::new());
    for_chunks_with(&mut out, co * l, scratch, |(cols, yw), bi, y| {
        if let (Some(sh), Some(wk)) = (&shifted, &wk) {
            sh.pad(&xf[bi * image..][..image], cols);
            return sh.forward(cols, wk, bs.as_deref(), groups, co, yw, y);
        }
        let cols = one.entry(&xf, bi, cols);
        for (g, y) in y.chunks_exact_mut(cog * l).enumerate() {
            let accum = match &bs {
                Some(bs) => {
                    let rows = y.chunks_exact_mut(l).zip(&bs[g * cog..]);
                    rows.for_each(|(row, &v)| row.fill(v));
                    Accum::Add
                }
                None => Accum::Replace,
            };
            let y = MatMut::from_row_major_slice_mut(y, cog, l);
            let c_g = MatRef::from_row_major_slice(&cols[g * rows * l..][..rows * l], rows, l);
            matmul(
                y,
                accum,
                block(&ws, g, cog, rows),
                c_g,
                F::one_impl(),
                Par::Seq,
            );
        }
    });
    drop(xf);
    let out = x
        .device()
        .try_tensor_from_vec(cast::<S, E>(S::stored(out)), (nb * co * l,))?;
    if T::OWNS_TAPE {
        let (x, wt, b, out_ghost) = (x.ghost(), wt.ghost(), b.map(|b| b.ghost()), out.ghost());
        tape.add_backward_op(move |grads| {
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            let gy: &Vec<S> = (&g_out as &dyn Any).downcast_ref().expect(CPU);
            let (gy, xs) = (S::compute(gy), S::compute(&xs));
            // The input's gradient, entry by entry, and partial sums of the weight's and the
            // bias's over fixed blocks of entries.
            const ENTRIES: usize = 4;
            let g_x = as_f::<E, S>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU));
            let mut partial: Vec<(Vec<F>, Vec<F>)> = Vec::new();
            let identity = one.identity();
            S::accumulate(g_x, |g_x| {
                let scratch = || {
                    let d_cols = match identity || shifted.is_some() {
                        true => Vec::new(),
                        false => vec![F::zero_impl(); c * k * k * l],
                    };
                    (Vec::new(), d_cols, Vec::new())
                };
                partial = g_x
                    .par_chunks_mut(ENTRIES * image)
                    .enumerate()
                    .map_init(scratch, |(cols, d_cols, gyw), (blk, g_x)| {
                        let (mut g_w, mut g_b) =
                            (vec![F::zero_impl(); co * rows], vec![F::zero_impl(); co]);
                        for (j, g_x) in g_x.chunks_exact_mut(image).enumerate() {
                            let bi = blk * ENTRIES + j;
                            let gy_b = &gy[bi * co * l..][..co * l];
                            for (gb, row) in g_b.iter_mut().zip(gy_b.chunks_exact(l)) {
                                *gb += row.iter().fold(F::zero_impl(), |a, &v| a + v);
                            }
                            if let (Some(sh), Some(wk)) = (&shifted, &wk) {
                                // The weight's gradient per tap in `g_w`, reordered below.
                                sh.pad(&xs[bi * image..][..image], cols);
                                let scratch = (&mut *gyw, &mut *d_cols);
                                sh.backward(cols, wk, gy_b, groups, co, scratch, &mut g_w, g_x);
                                continue;
                            }
                            let cols = one.entry(&xs, bi, cols);
                            for g in 0..groups {
                                let gy_g = MatRef::from_row_major_slice(
                                    &gy_b[g * cog * l..][..cog * l],
                                    cog,
                                    l,
                                );
                                let c_g = MatRef::from_row_major_slice(
                                    &cols[g * rows * l..][..rows * l],
                                    rows,
                                    l,
                                );
                                let g_w = MatMut::from_row_major_slice_mut(
                                    &mut g_w[g * cog * rows..][..cog * rows],
                                    cog,
                                    rows,
                                );
                                matmul(
                                    g_w,
                                    Accum::Add,
                                    gy_g,
                                    c_g.transpose(),
                                    F::one_impl(),
                                    Par::Seq,
                                );
                                // The columns' gradient, or for a 1×1 kernel the input's
                                // directly.
                                let (d_g, accum) = match identity {
                                    true => (&mut g_x[g * rows * l..][..rows * l], Accum::Add),
                                    false => {
                                        (&mut d_cols[g * rows * l..][..rows * l], Accum::Replace)
                                    }
                                };
                                matmul(
                                    MatMut::from_row_major_slice_mut(d_g, rows, l),
                                    accum,
                                    block(&ws, g, cog, rows).transpose(),
                                    gy_g,
                                    F::one_impl(),
                                    Par::Seq,
                                );
                            }
                            if !identity {
                                for ch in 0..c {
                                    let g_x = &mut g_x[ch * h * w..][..h * w];
                                    one.add_channel_grad(d_cols, ch, g_x);
                                }
                            }
                        }
                        if let Some(sh) = &shifted {
                            let per_tap =
                                std::mem::replace(&mut g_w, vec![F::zero_impl(); co * rows]);
                            sh.add_taps(&per_tap, co, c / groups, &mut g_w);
                        }
                        (g_w, g_b)
                    })
                    .collect();
            });
            let g_w = as_f::<E, S>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&wt)?).expect(CPU));
            S::accumulate(g_w, |g_w| {
                for (pw, _) in &partial {
                    g_w.iter_mut().zip(pw).for_each(|(a, &v)| *a += v);
                }
            });
            if let Some(b) = &b {
                let g_b = as_f::<E, S>(cpu_vec::<E, D>(grads.get_or_alloc_mut(b)?).expect(CPU));
                S::accumulate(g_b, |g_b| {
                    for (_, pb) in &partial {
                        g_b.iter_mut().zip(pb).for_each(|(a, &v)| *a += v);
                    }
                });
            }
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

impl<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
        OH: Dim,
        OW: Dim,
        B: Dim,
        H: Dim,
        W: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(B, Const<CI>, H, W), E, D, T>>
    for Conv2dModule<CI, CO, K, S, P, DIL, G, BIAS, OH, OW, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, Const<CO>, OH, OW), E, D, T>;
    type Error = Error;

    fn try_forward(&self, x: Tensor<(B, Const<CI>, H, W), E, D, T>) -> Result<Self::Output, Error> {
        type Builder<
            const CI: usize,
            const CO: usize,
            const K: usize,
            const S: usize,
            const P: usize,
            const DIL: usize,
            const G: usize,
            const BIAS: bool,
            OH,
            OW,
        > = Conv2d<CI, CO, K, S, P, DIL, G, BIAS, OH, OW>;
        #[allow(clippy::let_unit_value)]
        let () = Builder::<CI, CO, K, S, P, DIL, G, BIAS, OH, OW>::CHECK;
        let layer = Builder::<CI, CO, K, S, P, DIL, G, BIAS, OH, OW>::describe;
        let win = Window {
            k: K,
            s: S,
            p: P,
            dil: DIL,
        };
        let (b, _, h, w) = *x.shape();
        let oh: OH = win.out_dim(&layer(), "height", h.size())?;
        let ow: OW = win.out_dim(&layer(), "width", w.size())?;
        let (nb, l) = (b.size(), oh.size() * ow.size());
        if x.shape().num_elements() == 0 {
            return Ok(empty_output(x, (b, Const::<CO>, oh, ow))?);
        }
        if fused_stored::<E, D>() {
            let taps = ConvColumns {
                input: (nb, CI, h.size(), w.size()),
                out: (oh.size(), ow.size()),
                win,
            };
            let flat = x.try_reshape_like(&(taps.src_len(),))?;
            let bias = self.bias.as_ref();
            let y = stored_call!(
                E,
                conv_cpu::<_, _, _, _, E, D, T>(flat, &self.weight, bias, taps, G, CO)
            )?;
            return Ok(y.try_reshape_like(&(b, Const::<CO>, oh, ow))?);
        }
        let rows = CI / G * K * K;
        let cols = if fused_cpu::<E, D>() {
            // Straight into the layout of the product: `[G, CI/G·K·K, B·OH·OW]`.
            let taps = ConvColumns {
                input: (nb, CI, h.size(), w.size()),
                out: (oh.size(), ow.size()),
                win,
            };
            let flat = x.try_reshape_like(&(taps.src_len(),))?;
            conv_columns_cpu(flat, taps)?.try_reshape_like(&(G, rows, nb * l))?
        } else {
            // One example's columns, broadcast over the batch, then the batch moved inside.
            let taps = ConvColumns {
                input: (1, CI, h.size(), w.size()),
                out: (oh.size(), ow.size()),
                win,
            };
            gather_windows(x, b, taps, (P > 0).then(E::zero))?
                .try_reshape_like(&(nb, G, rows, l))?
                .try_permute::<_, Axes4<1, 2, 0, 3>>()?
                .try_reshape_like(&(G, rows, nb * l))?
        };
        let weight = self
            .weight
            .retaped::<T>()
            .try_reshape_like(&(G, CO / G, rows))?;
        // [G, CO/G, B·OH·OW] → [B, G, CO/G, OH·OW]: the only copy of the output.
        let y = weight
            .try_matmul(cols)?
            .try_reshape_like(&(G, CO / G, nb, l))?
            .try_permute::<_, Axes4<2, 0, 1, 3>>()?
            .try_reshape_like(&(b, Const::<CO>, oh, ow))?;
        Ok(match &self.bias {
            Some(bias) => {
                let shape = *y.shape();
                y.try_add(
                    bias.retaped::<T>()
                        .try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?,
                )?
            }
            None => y,
        })
    }
}

#[cfg(test)]
pub(super) mod reference {
    //! The cases written by `tools/reference/conv_pool.py`.

    use serde::Deserialize;

    /// One PyTorch case: input, parameters, output, upstream gradient and gradients.
    #[derive(Debug, Deserialize)]
    pub struct Case {
        pub name: String,
        pub x_shape: Vec<usize>,
        pub x: Vec<f64>,
        pub y_shape: Vec<usize>,
        pub y: Vec<f64>,
        pub g: Vec<f64>,
        pub grad_x: Vec<f64>,
        #[serde(default)]
        pub weight_shape: Vec<usize>,
        #[serde(default)]
        pub weight: Vec<f64>,
        #[serde(default)]
        pub grad_weight: Vec<f64>,
        #[serde(default)]
        pub bias: Option<Vec<f64>>,
        #[serde(default)]
        pub grad_bias: Option<Vec<f64>>,
    }

    #[derive(Deserialize)]
    struct File {
        cases: Vec<Case>,
    }

    /// The case called `name`.
    pub fn case(name: &str) -> Case {
        let file: File = serde_json::from_str(include_str!("../../tests/reference/conv_pool.json"))
            .expect("conv_pool.json parses");
        file.cases
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name} in conv_pool.json"))
    }

    /// Runs `f` on the CPU fast path, then on the op-composition path that other devices take;
    /// `f` gets `name` with the path appended.
    pub fn both_paths(name: &str, f: impl Fn(&str)) {
        super::super::cpu_fast::both_paths(|path| f(&format!("{name} ({path})")));
    }

    /// Largest `|a - b|`, after checking the lengths agree.
    pub fn max_diff(what: &str, a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len(), "{what}: lengths differ");
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Fails with the first values when `a` and `b` differ by more than `tol`.
    pub fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
        let d = max_diff(what, a, b);
        assert!(
            d <= tol,
            "{what}: max |ours - PyTorch| = {d:.3e} > {tol:.0e}\n ours: {:?}\n torch: {:?}",
            &a[..a.len().min(8)],
            &b[..b.len().min(8)]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu_fast::composition_only;
    use super::reference::{assert_close, both_paths, case};
    use crate::gradcheck::{check_input_grads, check_param_grads, named_values};
    use crate::prelude::*;
    use crate::Error;

    type Dev = Cpu;

    /// Runs the reference case `name` through `Conv2d<CI, CO, K, S, P, DIL, G, BIAS>` on both
    /// paths: forward values, and the gradients of `sum(y · g)` for the input, the weight and
    /// the bias.
    fn check_case<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
    >(
        name: &str,
    ) {
        both_paths(name, check_case_on::<CI, CO, K, S, P, DIL, G, BIAS>);
    }

    fn check_case_on<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
    >(
        name: &str,
    ) {
        let c = case(name.split(' ').next().unwrap());
        let dev = Dev::default();
        let mut conv = dev.build_module::<Conv2d<CI, CO, K, S, P, DIL, G, BIAS>, f64>();
        assert_eq!(conv.weight.shape().concrete().to_vec(), c.weight_shape);
        conv.weight.copy_from(&c.weight);
        assert_eq!(conv.bias.is_some(), c.bias.is_some());
        if let (Some(b), Some(want)) = (conv.bias.as_mut(), &c.bias) {
            b.copy_from(want);
        }
        let shape = (c.x_shape[0], Const::<CI>, c.x_shape[2], c.x_shape[3]);
        let x = dev.tensor_from_vec(c.x.clone(), shape);
        let g = dev.tensor_from_vec(
            c.g.clone(),
            (c.y_shape[0], Const::<CO>, c.y_shape[2], c.y_shape[3]),
        );
        let y = conv.try_forward(x.leaky_trace()).unwrap();
        assert_eq!(y.shape().concrete().to_vec(), c.y_shape, "{name}");
        assert_close(&format!("{name} forward"), &y.as_vec(), &c.y, 1e-12);
        let grads = (y * g).sum::<Rank0, _>().backward();
        assert_close(
            &format!("{name} grad x"),
            &grads.get(&x).as_vec(),
            &c.grad_x,
            1e-12,
        );
        assert_close(
            &format!("{name} grad weight"),
            &grads.get(&conv.weight).as_vec(),
            &c.grad_weight,
            1e-12,
        );
        if let (Some(b), Some(want)) = (&conv.bias, &c.grad_bias) {
            assert_close(
                &format!("{name} grad bias"),
                &grads.get(b).as_vec(),
                want,
                1e-12,
            );
        }
    }

    #[test]
    fn matches_pytorch_with_padding() {
        check_case::<2, 3, 3, 1, 1, 1, 1, true>("conv_basic");
    }

    #[test]
    fn matches_pytorch_with_stride_and_dilation() {
        check_case::<2, 4, 3, 2, 2, 2, 1, true>("conv_strided_dilated");
    }

    #[test]
    fn matches_pytorch_with_groups() {
        check_case::<4, 6, 3, 1, 1, 1, 2, true>("conv_grouped");
    }

    #[test]
    fn matches_pytorch_depthwise() {
        check_case::<3, 3, 3, 2, 1, 1, 3, true>("conv_depthwise");
    }

    #[test]
    fn matches_pytorch_without_bias() {
        check_case::<2, 3, 2, 1, 0, 1, 1, false>("conv_no_bias");
    }

    type Img<const C: usize> = (usize, Const<C>, usize, usize);

    /// Central differences for every parameter and every input value of `conv` on `x`.
    fn gradcheck<const CI: usize, const CO: usize, M>(
        conv: &mut M,
        x: Tensor<Img<CI>, f64, Dev>,
        name: &str,
    ) where
        M: TensorCollection<f64, Dev>
            + ZeroGrads<f64, Dev>
            + Module<
                Tensor<Img<CI>, f64, Dev, OwnedTape<f64, Dev>>,
                Output = Tensor<Img<CO>, f64, Dev, OwnedTape<f64, Dev>>,
                Error = Error,
            >,
    {
        // A loss that weighs every output differently, so a permuted output would not pass.
        let loss = |y: Tensor<Img<CO>, f64, Dev, OwnedTape<f64, Dev>>| {
            let n = y.shape().num_elements();
            let w: Vec<f64> = (0..n).map(|i| 0.3 + (i % 7) as f64 * 0.1).collect();
            let w = y.device().tensor_from_vec(w, *y.shape());
            (y.with_empty_tape().square() * 0.5 + y * w).sum::<Rank0, _>()
        };
        let report = check_param_grads(conv, |m, grads| {
            loss(m.try_forward(x.trace(grads)).unwrap())
        });
        let params = named_values(conv)
            .iter()
            .map(|(_, v)| v.len())
            .sum::<usize>();
        assert_eq!(report.checked, params);
        assert!(report.max_abs_err <= 1e-6, "{name} parameters: {report}");
        eprintln!("{name} parameters: {report}");
        let report = check_input_grads(&x, |x| loss(conv.try_forward(x).unwrap()));
        assert!(report.max_abs_err <= 1e-6, "{name} input: {report}");
        eprintln!("{name} input: {report}");
    }

    fn image<const C: usize>(
        dev: &Dev,
        (b, h, w): (usize, usize, usize),
    ) -> Tensor<Img<C>, f64, Dev> {
        dev.sample_normal_like(&(b, Const, h, w))
    }

    /// `f16` and `bf16` take the fused path: computed in `f32` from the half values (the
    /// input, weight and bias) and each result rounded once, within one spacing of the `f64`
    /// path on the same values; grouped, so that the weight's blocks are widened in place.
    /// With 4 input channels through the columns, with 16 (8 per group) through the shifted
    /// products.
    #[test]
    fn half_convolution_computes_in_f32_and_rounds_once() {
        half_rounds_once::<half::f16, 4>(2f64.powi(-10));
        half_rounds_once::<half::bf16, 4>(2f64.powi(-7));
        half_rounds_once::<half::f16, 16>(2f64.powi(-10));
        half_rounds_once::<half::bf16, 16>(2f64.powi(-7));
    }

    fn half_rounds_once<H, const CI: usize>(spacing: f64)
    where
        H: crate::Elem + num_traits::AsPrimitive<f64>,
        Dev: Device<H>,
        f64: num_traits::AsPrimitive<H>,
    {
        let dev = Dev::seed_from_u64(4);
        let mut wide = dev.build_module::<Conv2d<CI, 6, 3, 1, 1, 1, 2>, f64>();
        wide.weight = wide.weight.clone().to_dtype::<H>().to_dtype::<f64>();
        let bias = wide.bias.take().unwrap();
        wide.bias = Some(bias.to_dtype::<H>().to_dtype::<f64>());
        let mut narrow = dev.build_module::<Conv2d<CI, 6, 3, 1, 1, 1, 2>, H>();
        narrow.weight = wide.weight.clone().to_dtype::<H>();
        narrow.bias = wide.bias.clone().map(|b| b.to_dtype::<H>());
        let x = image::<CI>(&dev, (3, 7, 6))
            .to_dtype::<H>()
            .to_dtype::<f64>();
        let c = image::<6>(&dev, (3, 7, 6))
            .to_dtype::<H>()
            .to_dtype::<f64>();
        let want = {
            let y = wide.forward(x.leaky_trace());
            let values = y.as_vec();
            let g = (y * c.clone()).sum::<Rank0, _>().backward();
            let bias = wide.bias.as_ref().unwrap();
            [
                values,
                g.get(&x).as_vec(),
                g.get(&wide.weight).as_vec(),
                g.get(bias).as_vec(),
            ]
        };
        let (xh, ch) = (x.to_dtype::<H>(), c.to_dtype::<H>());
        let f64s = |v: Vec<H>| v.iter().map(|x| x.as_()).collect::<Vec<f64>>();
        let got = {
            let y = narrow.forward(xh.leaky_trace());
            let values = f64s(y.as_vec());
            let g = (y * ch).sum::<Rank0, _>().backward();
            let bias = narrow.bias.as_ref().unwrap();
            [
                values,
                f64s(g.get(&xh).as_vec()),
                f64s(g.get(&narrow.weight).as_vec()),
                f64s(g.get(bias).as_vec()),
            ]
        };
        super::super::cpu_fast::assert_rounded_once("convolution", &got, &want, spacing);
    }

    #[test]
    fn gradients_match_central_differences_padded() {
        let dev = Dev::seed_from_u64(1);
        let conv = dev.build_module::<Conv2d<2, 3, 3, 1, 1>, f64>();
        let x = image(&dev, (2, 4, 5));
        both_paths("padded", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
    }

    #[test]
    fn gradients_match_central_differences_grouped() {
        let dev = Dev::seed_from_u64(2);
        let conv = dev.build_module::<Conv2d<4, 4, 3, 1, 1, 1, 2>, f64>();
        let x = image(&dev, (1, 4, 4));
        both_paths("grouped", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
        let conv = dev.build_module::<Conv2d<3, 3, 3, 1, 1, 1, 3, false>, f64>();
        let x = image(&dev, (2, 3, 4));
        both_paths("depthwise without bias", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
    }

    #[test]
    fn gradients_match_central_differences_dilated_strided() {
        let dev = Dev::seed_from_u64(3);
        let conv = dev.build_module::<Conv2d<2, 2, 3, 2, 2, 2>, f64>();
        let x = image(&dev, (1, 6, 5));
        both_paths("dilated, strided", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
    }

    /// A 1×1 kernel with stride 1 and no padding multiplies the input itself (no columns) and
    /// adds the input's gradient straight from the product.
    #[test]
    fn gradients_match_central_differences_pointwise() {
        let dev = Dev::seed_from_u64(5);
        let conv = dev.build_module::<Conv2d<4, 6, 1, 1, 0, 1, 2>, f64>();
        let x = image(&dev, (2, 3, 5));
        both_paths("pointwise, grouped", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
    }

    /// With at least `Shifted::MIN_CHANNELS` input channels per group, a stride-1 kernel runs
    /// as shifted products on the padded input: padded or not, dilated, grouped, with and
    /// without a bias.
    #[test]
    fn gradients_match_central_differences_shifted() {
        let dev = Dev::seed_from_u64(10);
        let conv = dev.build_module::<Conv2d<8, 3, 3, 1, 1>, f64>();
        let x = image(&dev, (2, 4, 5));
        both_paths("shifted, padded", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
        let conv = dev.build_module::<Conv2d<8, 2, 3, 1, 0, 2, 1, false>, f64>();
        let x = image(&dev, (1, 6, 7));
        both_paths("shifted, dilated, unpadded, without bias", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
        let conv = dev.build_module::<Conv2d<16, 4, 2, 1, 2, 1, 2>, f64>();
        let x = image(&dev, (1, 3, 4));
        both_paths("shifted, grouped, even kernel, padding 2", |name| {
            gradcheck(&mut conv.clone(), x.clone(), name)
        });
    }

    /// The fused path against the composition on batches that fill several tasks and blocks
    /// of entries (whose columns buffers are reused from entry to entry, on one thread
    /// certainly), for each way the
    /// columns are built: contiguous runs, per element (stride 2), none (1×1), and for the
    /// shifted products (8 channels; padded and not, dilated, grouped).
    #[test]
    fn the_fused_path_agrees_with_the_composition_on_many_entries() {
        fn agree<const K: usize, const S: usize, const P: usize>(seed: u64) {
            agree_on::<3, K, S, P, 1, 1>(seed)
        }
        fn agree_on<
            const C: usize,
            const K: usize,
            const S: usize,
            const P: usize,
            const DIL: usize,
            const G: usize,
        >(
            seed: u64,
        ) {
            let dev = Dev::seed_from_u64(seed);
            let conv = dev.build_module::<Conv2d<C, 4, K, S, P, DIL, G>, f64>();
            let x = image::<C>(&dev, (11, 6, 7));
            let c = dev.sample_normal_like(conv.forward(x.clone()).shape());
            let d = dev.sample_normal_like(x.shape());
            let run = || {
                let y = conv.forward(x.leaky_trace());
                let values = y.as_vec();
                // `x·d` is recorded last, so its gradient is in `x`'s before the convolution
                // adds to it.
                let loss = (y * c.clone()).sum::<Rank0, _>()
                    + (x.leaky_trace() * d.clone()).sum::<Rank0, _>();
                let g = loss.backward();
                let bias = conv.bias.as_ref().unwrap();
                [
                    values,
                    g.get(&x).as_vec(),
                    g.get(&conv.weight).as_vec(),
                    g.get(bias).as_vec(),
                ]
            };
            let composed = composition_only(run);
            // On one thread every entry reuses one task's buffers; on more, rayon may give
            // each entry its own.
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            for (threads, fused) in [("pool", run()), ("one thread", one.install(run))] {
                for (what, (a, b)) in ["output", "input", "weight", "bias"]
                    .iter()
                    .zip(fused.iter().zip(&composed))
                {
                    let case = format!("C={C} K={K} S={S} P={P} DIL={DIL} G={G} {threads} {what}");
                    assert_close(&case, a, b, 1e-12);
                }
            }
        }
        agree::<3, 1, 1>(6);
        agree::<3, 2, 1>(7);
        agree::<1, 1, 0>(8);
        agree::<1, 2, 0>(9);
        agree_on::<8, 3, 1, 1, 1, 1>(11);
        agree_on::<8, 3, 1, 0, 1, 1>(12);
        agree_on::<8, 3, 1, 2, 2, 1>(13);
        agree_on::<16, 3, 1, 1, 1, 2>(14);
        agree_on::<8, 3, 2, 1, 1, 1>(15);
    }

    #[test]
    fn params_const_equals_runtime_count_and_names_follow_pytorch() {
        let dev = Dev::default();
        let mut c = dev.build_module::<Conv2d<4, 6, 3, 1, 1, 1, 2>, f32>();
        assert_eq!(Conv2d::<4, 6, 3, 1, 1, 1, 2>::PARAMS, 6 * 2 * 9 + 6);
        assert_eq!(
            Conv2d::<4, 6, 3, 1, 1, 1, 2>::PARAMS,
            c.num_trainable_params()
        );
        let d = dev.build_module::<Conv2d<8, 8, 3, 1, 1, 1, 8, false>, f32>();
        assert_eq!(Conv2d::<8, 8, 3, 1, 1, 1, 8, false>::PARAMS, 8 * 9);
        assert_eq!(d.num_trainable_params(), 8 * 9);
        let mut c64 = c.clone().to_dtype::<f64>();
        let names: Vec<String> = named_values(&mut c64).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight", "bias"]);
        let mut d64 = d.to_dtype::<f64>();
        let names: Vec<String> = named_values(&mut d64).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight"]);
        // PyTorch's bound 1/√(CI/G·K·K) = 1/√18.
        let bound = 1.0 / 18f32.sqrt();
        assert!(c.weight.as_vec().iter().all(|w| w.abs() <= bound));
        c.reset_params();
        assert!(c.bias.unwrap().as_vec().iter().all(|w| w.abs() <= bound));
    }

    #[test]
    fn declared_output_sizes_are_types() {
        let dev = Dev::default();
        let conv = dev.build_module::<Conv2d<2, 3, 3, 2, 1, 1, 1, true, Const<3>, Const<4>>, f32>();
        let x: Tensor<Rank4<2, 2, 5, 8>, f32, _> = dev.sample_normal();
        let y: Tensor<Rank4<2, 3, 3, 4>, f32, _> = conv.try_forward(x).unwrap();
        assert_eq!(y.shape().concrete(), [2, 3, 3, 4]);
        // The same weights with runtime sizes give the same numbers.
        let free = Conv2dModule::<2, 3, 3, 2, 1, 1, 1, true, usize, usize, f32, Dev> {
            weight: conv.weight.clone(),
            bias: conv.bias.clone(),
            out: Default::default(),
        };
        let x: Tensor<Rank4<2, 2, 5, 8>, f32, _> = dev.sample_normal();
        let rt = x
            .clone()
            .reshape_like(&(2usize, Const::<2>, 5usize, 8usize));
        assert_eq!(
            free.try_forward(rt).unwrap().as_vec(),
            conv.try_forward(x).unwrap().as_vec()
        );
    }

    #[test]
    fn runtime_sizes_and_shape_errors() {
        let dev = Dev::default();
        let conv = dev.build_module::<Conv2d<1, 2, 5, 1, 1>, f32>();
        both_paths("runtime sizes", |_| {
            for b in [3, 0] {
                let x: Tensor<(usize, Const<1>, usize, usize), f32, _> =
                    dev.zeros_like(&(b, Const, 7, 9));
                assert_eq!(conv.try_forward(x).unwrap().shape(), &(b, Const::<2>, 5, 7));
            }
        });
        let small: Tensor<(usize, Const<1>, usize, usize), f32, _> =
            dev.zeros_like(&(1, Const, 2, 9));
        let err = conv.try_forward(small).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("Conv2d<1, 2, 5>")
                && err.contains("input height 2")
                && err.contains("reach 5"),
            "{err}"
        );
        let fixed =
            dev.build_module::<Conv2d<1, 2, 3, 1, 1, 1, 1, true, Const<8>, Const<8>>, f32>();
        let x: Tensor<(usize, Const<1>, usize, usize), f32, _> = dev.zeros_like(&(1, Const, 8, 7));
        let err = fixed.try_forward(x).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("input width of 7 gives an output width of 7")
                && err.contains("`Const<8>`"),
            "{err}"
        );
    }

    /// `cargo test --release -p neural-arch conv_forward_backward_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a test: run it in release mode"]
    fn conv_forward_backward_timing() {
        let dev = Dev::seed_from_u64(0);
        let conv = dev.build_module::<Conv2d<16, 32, 3, 1, 1>, f32>();
        let x: Tensor<Rank4<8, 16, 28, 28>, f32, _> = dev.sample_normal();
        both_paths("Conv2d<16, 32, 3, 1, 1> on [8, 16, 28, 28] f32", |name| {
            let mut times = Vec::new();
            for _ in 0..20 {
                let t0 = std::time::Instant::now();
                let y = conv.try_forward(x.trace(conv.alloc_grads())).unwrap();
                let t1 = std::time::Instant::now();
                let g = y.sum::<Rank0, _>().backward();
                let t2 = std::time::Instant::now();
                std::hint::black_box(g);
                times.push(((t1 - t0).as_secs_f64(), (t2 - t0).as_secs_f64()));
            }
            times.sort_by(|a, b| a.1.total_cmp(&b.1));
            let (fwd, total) = times[times.len() / 2];
            eprintln!(
                "{name}: forward {:.2} ms, forward+backward {:.2} ms (median of 20)",
                fwd * 1e3,
                total * 1e3
            );
        });
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    //! The family on CUDA (the op-composition path: dfdx's gather, matmul and reductions) against
    //! the CPU (the fused path), in f64: outputs and every gradient. Needs a GPU:
    //! `cargo test -p neural-arch --features cuda --lib cuda_tests`.

    use crate::prelude::*;
    use dfdx::tensor::Cuda;

    type Img<const C: usize, Dv> = Tensor<(usize, Const<C>, usize, usize), f64, Dv>;

    fn worst(what: &str, a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        eprintln!("{what}: max |cuda - cpu| = {d:.2e} over {} values", a.len());
        assert!(d < 1e-9, "{what}: {d:e}");
        d
    }

    fn conv<
        const CI: usize,
        const CO: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        const G: usize,
        const BIAS: bool,
    >(
        name: &str,
        (b, h, w): (usize, usize, usize),
    ) {
        let (cpu, gpu) = (Cpu::seed_from_u64(1), Cuda::default());
        let m = cpu.build_module::<Conv2d<CI, CO, K, S, P, DIL, G, BIAS>, f64>();
        let mg = m.to_device(&gpu);
        let x: Img<CI, Cpu> = cpu.sample_normal_like(&(b, Const, h, w));
        let xg = x.to_device(&gpu);
        let y = m.try_forward(x.leaky_trace()).unwrap();
        let yg = mg.try_forward(xg.leaky_trace()).unwrap();
        worst(&format!("{name} forward"), &y.as_vec(), &yg.as_vec());
        let g = y.square().sum::<Rank0, _>().backward();
        let gg = yg.square().sum::<Rank0, _>().backward();
        worst(
            &format!("{name} grad x"),
            &g.get(&x).as_vec(),
            &gg.get(&xg).as_vec(),
        );
        worst(
            &format!("{name} grad weight"),
            &g.get(&m.weight).as_vec(),
            &gg.get(&mg.weight).as_vec(),
        );
        if let (Some(b), Some(bg)) = (&m.bias, &mg.bias) {
            worst(
                &format!("{name} grad bias"),
                &g.get(b).as_vec(),
                &gg.get(bg).as_vec(),
            );
        }
    }

    fn pool<L, const C: usize>(name: &str, layer: L, (b, h, w): (usize, usize, usize))
    where
        L: Copy
            + Module<
                Tensor<(usize, Const<C>, usize, usize), f64, Cpu, OwnedTape<f64, Cpu>>,
                Output = Tensor<(usize, Const<C>, usize, usize), f64, Cpu, OwnedTape<f64, Cpu>>,
                Error = crate::Error,
            > + Module<
                Tensor<(usize, Const<C>, usize, usize), f64, Cuda, OwnedTape<f64, Cuda>>,
                Output = Tensor<(usize, Const<C>, usize, usize), f64, Cuda, OwnedTape<f64, Cuda>>,
                Error = crate::Error,
            >,
    {
        let (cpu, gpu) = (Cpu::seed_from_u64(2), Cuda::default());
        let x: Img<C, Cpu> = cpu.sample_normal_like(&(b, Const, h, w));
        let xg = x.to_device(&gpu);
        let y = layer.try_forward(x.leaky_trace()).unwrap();
        let yg = layer.try_forward(xg.leaky_trace()).unwrap();
        worst(&format!("{name} forward"), &y.as_vec(), &yg.as_vec());
        let g = y.square().sum::<Rank0, _>().backward();
        let gg = yg.square().sum::<Rank0, _>().backward();
        worst(
            &format!("{name} grad x"),
            &g.get(&x).as_vec(),
            &gg.get(&xg).as_vec(),
        );
    }

    #[test]
    fn conv_pool_and_patch_agree_with_the_cpu() {
        conv::<3, 8, 3, 1, 1, 1, 1, true>("conv 3x3 pad 1", (2, 9, 7));
        conv::<4, 6, 3, 2, 2, 2, 2, true>("conv grouped strided dilated", (2, 11, 10));
        conv::<8, 8, 3, 1, 1, 1, 8, false>("conv depthwise no bias", (3, 6, 6));
        conv::<3, 16, 7, 2, 3, 1, 1, false>("conv 7x7 stride 2 (ResNet stem)", (2, 32, 32));
        pool::<_, 4>("max pool 3/2/1", MaxPool2d::<3, 2, 1>::default(), (2, 9, 8));
        pool::<_, 4>("max pool 2", MaxPool2d::<2>::default(), (2, 8, 8));
        pool::<_, 4>("avg pool 3/2/1", AvgPool2d::<3, 2, 1>::default(), (2, 9, 8));
        let (cpu, gpu) = (Cpu::seed_from_u64(3), Cuda::default());
        let x: Img<5, Cpu> = cpu.sample_normal_like(&(2, Const, 6, 7));
        let xg = x.to_device(&gpu);
        let y = GlobalAvgPool.forward(x.leaky_trace());
        let yg = GlobalAvgPool.forward(xg.leaky_trace());
        worst("global avg pool forward", &y.as_vec(), &yg.as_vec());
        let g = y.square().sum::<Rank0, _>().backward();
        let gg = yg.square().sum::<Rank0, _>().backward();
        worst(
            "global avg pool grad x",
            &g.get(&x).as_vec(),
            &gg.get(&xg).as_vec(),
        );
        let m = cpu.build_module::<PatchEmbed<3, 8, 4>, f64>();
        let mg = m.to_device(&gpu);
        let x: Img<3, Cpu> = cpu.sample_normal_like(&(2, Const, 16, 12));
        let xg = x.to_device(&gpu);
        let y = m.try_forward(x.leaky_trace()).unwrap();
        let yg = mg.try_forward(xg.leaky_trace()).unwrap();
        worst("patch embed forward", &y.as_vec(), &yg.as_vec());
        let g = y.square().sum::<Rank0, _>().backward();
        let gg = yg.square().sum::<Rank0, _>().backward();
        worst(
            "patch embed grad x",
            &g.get(&x).as_vec(),
            &gg.get(&xg).as_vec(),
        );
        worst(
            "patch embed grad weight",
            &g.get(&m.projection.weight).as_vec(),
            &gg.get(&mg.projection.weight).as_vec(),
        );
    }

    /// Forward+backward of a convolution in f32 on the GPU, median of `n` after a warm-up.
    fn time<const CI: usize, const CO: usize, const K: usize, const P: usize>(
        shape: (usize, usize, usize),
        n: usize,
    ) {
        use dfdx::tensor::Synchronize;
        let gpu = Cuda::default();
        let m = gpu.build_module::<Conv2d<CI, CO, K, 1, P>, f32>();
        let x: Tensor<(usize, Const<CI>, usize, usize), f32, Cuda> =
            gpu.sample_normal_like(&(shape.0, Const, shape.1, shape.2));
        let mut t = Vec::new();
        for i in 0..n + 2 {
            gpu.synchronize();
            let t0 = std::time::Instant::now();
            let y = m.try_forward(x.trace(m.alloc_grads())).unwrap();
            gpu.synchronize();
            let t1 = std::time::Instant::now();
            let g = y.sum::<Rank0, _>().backward();
            gpu.synchronize();
            let t2 = std::time::Instant::now();
            drop(g);
            if i >= 2 {
                t.push(((t1 - t0).as_secs_f64(), (t2 - t0).as_secs_f64()));
            }
        }
        t.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (f, tot) = t[t.len() / 2];
        // The part of that spent on the host: building one example's gather index (broadcast
        // over the batch) and uploading it.
        let taps = super::ConvColumns {
            input: (1, CI, shape.1, shape.2),
            out: (shape.1 + 2 * P + 1 - K, shape.2 + 2 * P + 1 - K),
            win: super::Window {
                k: K,
                s: 1,
                p: P,
                dil: 1,
            },
        };
        let t0 = std::time::Instant::now();
        let mut idx = Vec::with_capacity(super::Taps::len(&taps));
        super::Taps::for_each(&taps, |i| idx.push(i));
        let t1 = std::time::Instant::now();
        let n_idx = idx.len();
        let idx = gpu.tensor_from_vec(idx, (n_idx,));
        gpu.synchronize();
        let t2 = std::time::Instant::now();
        drop(idx);
        eprintln!(
            "CUDA Conv2d<{CI}, {CO}, {K}, 1, {P}> on [{}, {CI}, {}, {}] f32: forward {:.2} ms, forward+backward {:.2} ms (median of {n}); of which building the {n_idx}-entry index {:.2} ms, uploading it {:.2} ms",
            shape.0,
            shape.1,
            shape.2,
            f * 1e3,
            tot * 1e3,
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
        );
    }

    #[test]
    #[ignore = "a timing: run it with --ignored on a GPU"]
    fn cuda_conv_timing() {
        time::<16, 32, 3, 1>((8, 28, 28), 20);
        time::<64, 64, 3, 1>((32, 56, 56), 5);
    }
}
