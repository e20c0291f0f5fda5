//! Pooling over NCHW images: max and average over sliding windows, and the global average.
//!
//! The windows are gathered with the convolution's im2col step (one `gather`, or a fused loop
//! on the CPU), then reduced over the window axis with dfdx's `max` or `mean`.

use super::conv::{empty_output, gather_windows, zero_sized_builder_traits, Taps, Window};
use super::LayerInfo;
use crate::{Elem, Error};
use dfdx::nn::{Module, NonMutableModule, ZeroSizedModule};
use dfdx::shapes::{Axes2, Axis, Const, Dim, HasShape, Shape};
use dfdx::tensor::{HasErr, Tape, Tensor};
use dfdx::tensor_ops::{Device, MaxTo, MeanTo, ReshapeTo};
use std::marker::PhantomData;

/// The windows of a pooling layer over one example, in the order `(c, i, j, u, v)`: channel,
/// output row, output column, then the `K·K` taps of the window, so that the window is the
/// last axis.
#[derive(Debug, Clone, Copy)]
struct PoolWindows {
    /// Input `[C, H, W]`.
    input: (usize, usize, usize),
    /// Output `[OH, OW]`.
    out: (usize, usize),
    win: Window,
}

impl Taps for PoolWindows {
    fn src_len(&self) -> usize {
        let (c, h, w) = self.input;
        c * h * w
    }
    fn len(&self) -> usize {
        self.input.0 * self.out.0 * self.out.1 * self.win.k * self.win.k
    }
    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize)) {
        let ((c, h, w), (oh, ow), win) = (self.input, self.out, self.win);
        let pad = self.src_len();
        for image in (0..c).map(|ch| ch * h * w) {
            for i in 0..oh {
                for j in 0..ow {
                    for u in 0..win.k {
                        match win.source(i, u, h) {
                            Some(y) => {
                                for v in 0..win.k {
                                    f(win.source(j, v, w).map_or(pad, |x| image + y * w + x));
                                }
                            }
                            None => (0..win.k).for_each(|_| f(pad)),
                        }
                    }
                }
            }
        }
    }
}

/// `[B, C, OH·OW, K·K]`: every window of every channel, the window last.
type Windows<B, const C: usize, E, D, T> = Tensor<(B, Const<C>, usize, usize), E, D, T>;

/// The windows of `x`, padded with `pad`.
fn windows<const C: usize, B: Dim, H: Dim, W: Dim, E: Elem, D, T>(
    x: Tensor<(B, Const<C>, H, W), E, D, T>,
    out: (usize, usize),
    win: Window,
    pad: E,
) -> Result<Windows<B, C, E, D, T>, D::Err>
where
    D: Device<E>,
    T: Tape<E, D>,
{
    let (b, _, h, w) = *x.shape();
    let taps = PoolWindows {
        input: (C, h.size(), w.size()),
        out,
        win,
    };
    gather_windows(x, b, taps, (win.p > 0).then_some(pad))?.try_reshape_like(&(
        b,
        Const::<C>,
        out.0 * out.1,
        win.k * win.k,
    ))
}

/// Max pooling: the largest value of each `K`×`K` window, moved by stride `S` (default `K`),
/// over the input padded by `P` on every side with `-∞` (so padding never wins).
///
/// `y[b, c, i, j] = max_{u, v < K} x[b, c, S·i + u − P, S·j + v − P]`.
///
/// # Shapes
/// `[B, C, H, W] -> [B, C, OH, OW]`, any `C`, with `OH = (H + 2·P − K) / S + 1` (rounded down,
/// PyTorch's `ceil_mode=False`) and likewise `OW`; `OH`/`OW` are `usize` or a declared
/// `Const<n>`, checked at run time like [`Conv2d`](super::Conv2d)'s. `2·P ≤ K` and `K, S ≥ 1`
/// are checked at compile time. No parameters.
///
/// On ties inside a window every maximal element receives the gradient (dfdx's `max`), where
/// PyTorch gives it to one of them; values differ only there.
///
/// PyTorch: `torch.nn.MaxPool2d(K, stride=S, padding=P)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let x: Tensor<Rank4<1, 1, 2, 4>, f32, _> =
///     dev.tensor([[[[1.0, 5.0, 2.0, 0.0], [3.0, 4.0, -1.0, 6.0]]]]);
/// let y = MaxPool2d::<2>::default().try_forward(x)?;
/// assert_eq!(y.as_vec(), [5.0, 6.0]);
/// assert_eq!(y.shape(), &(Const::<1>, Const::<1>, 1, 2));
/// # Ok::<(), neural_arch::Error>(())
/// ```
pub struct MaxPool2d<const K: usize, const S: usize = K, const P: usize = 0, OH = usize, OW = usize>(
    PhantomData<(OH, OW)>,
);

/// Average pooling: the mean of each `K`×`K` window, moved by stride `S` (default `K`), over
/// the input zero-padded by `P` on every side; padded positions count in the mean (PyTorch's
/// `count_include_pad=True`), so every window is divided by `K·K`.
///
/// `y[b, c, i, j] = 1/K² · Σ_{u, v < K} x[b, c, S·i + u − P, S·j + v − P]`, zero outside.
///
/// # Shapes
/// `[B, C, H, W] -> [B, C, OH, OW]` exactly as [`MaxPool2d`]. No parameters.
///
/// PyTorch: `torch.nn.AvgPool2d(K, stride=S, padding=P)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let x: Tensor<Rank4<1, 1, 2, 4>, f32, _> =
///     dev.tensor([[[[1.0, 5.0, 2.0, 0.0], [3.0, 4.0, -1.0, 6.0]]]]);
/// let y = AvgPool2d::<2>::default().try_forward(x)?;
/// assert_eq!(y.as_vec(), [3.25, 1.75]);
/// # Ok::<(), neural_arch::Error>(())
/// ```
pub struct AvgPool2d<const K: usize, const S: usize = K, const P: usize = 0, OH = usize, OW = usize>(
    PhantomData<(OH, OW)>,
);

zero_sized_builder_traits!(MaxPool2d [K: usize, S: usize, P: usize] [OH, OW]);
zero_sized_builder_traits!(AvgPool2d [K: usize, S: usize, P: usize] [OH, OW]);

macro_rules! pool {
    ($name:ident, $what:literal, $pad:expr, |$cols:ident| $reduce:expr) => {
        impl<const K: usize, const S: usize, const P: usize, OH, OW> $name<K, S, P, OH, OW> {
            /// The compile-time rules of the layer; evaluated when the layer runs.
            pub const CHECK: () = {
                assert!(
                    K >= 1,
                    concat!($what, " needs a kernel size K of at least 1")
                );
                assert!(S >= 1, concat!($what, " needs a stride S of at least 1"));
                assert!(
                    2 * P <= K,
                    concat!(
                        $what,
                        ": the padding P must be at most half the kernel K (PyTorch refuses \
                         more: a window could hold only padding)"
                    )
                );
            };
        }

        impl<const K: usize, const S: usize, const P: usize, OH, OW> LayerInfo
            for $name<K, S, P, OH, OW>
        {
            const PARAMS: usize = {
                #[allow(clippy::let_unit_value)]
                let () = Self::CHECK;
                0
            };
        }

        impl<const K: usize, const S: usize, const P: usize, OH, OW> ZeroSizedModule
            for $name<K, S, P, OH, OW>
        {
        }
        impl<const K: usize, const S: usize, const P: usize, OH, OW> NonMutableModule
            for $name<K, S, P, OH, OW>
        {
        }

        impl<
                const K: usize,
                const S: usize,
                const P: usize,
                OH: Dim,
                OW: Dim,
                B: Dim,
                const C: usize,
                H: Dim,
                W: Dim,
                E: Elem,
                D: Device<E>,
                T: Tape<E, D>,
            > Module<Tensor<(B, Const<C>, H, W), E, D, T>> for $name<K, S, P, OH, OW>
        where
            Error: From<<D as HasErr>::Err>,
        {
            type Output = Tensor<(B, Const<C>, OH, OW), E, D, T>;
            type Error = Error;

            fn try_forward(
                &self,
                x: Tensor<(B, Const<C>, H, W), E, D, T>,
            ) -> Result<Self::Output, Error> {
                #[allow(clippy::let_unit_value)]
                let () = Self::CHECK;
                let layer = format!(concat!($what, "<{}> (stride {}, padding {})"), K, S, P);
                let win = Window {
                    k: K,
                    s: S,
                    p: P,
                    dil: 1,
                };
                let (b, _, h, w) = *x.shape();
                let oh: OH = win.out_dim(&layer, "height", h.size())?;
                let ow: OW = win.out_dim(&layer, "width", w.size())?;
                if x.shape().num_elements() == 0 {
                    return Ok(empty_output(x, (b, Const::<C>, oh, ow))?);
                }
                let $cols = windows(x, (oh.size(), ow.size()), win, $pad)?;
                let y: Tensor<(B, Const<C>, usize), E, D, T> = $reduce?;
                Ok(y.try_reshape_like(&(b, Const::<C>, oh, ow))?)
            }
        }
    };
}

pool!(MaxPool2d, "MaxPool2d", E::neg_infinity(), |cols| cols
    .try_max::<_, Axis<3>>());
pool!(AvgPool2d, "AvgPool2d", E::zero(), |cols| cols
    .try_mean::<_, Axis<3>>());

/// Global average pooling: the mean of each channel over the whole image, `y[b, c] =
/// 1/(H·W) · Σ_{i, j} x[b, c, i, j]`, the head of ResNet-style classifiers.
///
/// # Shapes
/// `[B, C, H, W] -> [B, C]`, any sizes. No parameters.
///
/// PyTorch: `torch.nn.AdaptiveAvgPool2d(1)` followed by `torch.nn.Flatten()`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let x: Tensor<Rank4<1, 2, 1, 2>, f32, _> = dev.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]]);
/// let y = GlobalAvgPool.forward(x);
/// assert_eq!(y.array(), [[2.0, -1.0]]);
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GlobalAvgPool;

impl ZeroSizedModule for GlobalAvgPool {}
impl NonMutableModule for GlobalAvgPool {}

impl LayerInfo for GlobalAvgPool {
    const PARAMS: usize = 0;
}

impl<B: Dim, const C: usize, H: Dim, W: Dim, E: Elem, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, Const<C>, H, W), E, D, T>> for GlobalAvgPool
{
    type Output = Tensor<(B, Const<C>), E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<(B, Const<C>, H, W), E, D, T>) -> Result<Self::Output, D::Err> {
        x.try_mean::<_, Axes2<2, 3>>()
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::reference::{assert_close, both_paths, case};
    use crate::gradcheck::check_input_grads;
    use crate::prelude::*;

    type Dev = Cpu;
    type Img<const C: usize> = (usize, Const<C>, usize, usize);

    /// The reference case `name` through `layer` on both paths: output and input gradient.
    fn check_case<const C: usize, L>(name: &str, layer: L)
    where
        L: Module<
                Tensor<Img<C>, f64, Dev, OwnedTape<f64, Dev>>,
                Output = Tensor<Img<C>, f64, Dev, OwnedTape<f64, Dev>>,
                Error = ModelError,
            > + Copy,
    {
        both_paths(name, |label| {
            let c = case(name);
            let dev = Dev::default();
            let shape = (c.x_shape[0], Const::<C>, c.x_shape[2], c.x_shape[3]);
            let x = dev.tensor_from_vec(c.x.clone(), shape);
            let y = layer.try_forward(x.leaky_trace()).unwrap();
            assert_eq!(y.shape().concrete().to_vec(), c.y_shape, "{label}");
            assert_close(&format!("{label} forward"), &y.as_vec(), &c.y, 1e-12);
            let g = dev.tensor_from_vec(c.g.clone(), *y.shape());
            let grads = (y * g).sum::<Rank0, _>().backward();
            assert_close(
                &format!("{label} grad x"),
                &grads.get(&x).as_vec(),
                &c.grad_x,
                1e-12,
            );
        });
    }

    #[test]
    fn max_pool_matches_pytorch() {
        check_case::<2, _>("max_pool", MaxPool2d::<3, 2, 1>::default());
        check_case::<2, _>("max_pool_default_stride", MaxPool2d::<2>::default());
    }

    #[test]
    fn avg_pool_matches_pytorch() {
        check_case::<2, _>("avg_pool", AvgPool2d::<3, 2, 1>::default());
        check_case::<2, _>("avg_pool_overlap", AvgPool2d::<2, 1>::default());
    }

    #[test]
    fn global_avg_pool_matches_pytorch() {
        let c = case("global_avg_pool");
        let dev = Dev::default();
        let x = dev.tensor_from_vec(
            c.x.clone(),
            (c.x_shape[0], Const::<3>, c.x_shape[2], c.x_shape[3]),
        );
        let y = GlobalAvgPool.forward(x.leaky_trace());
        assert_close("global forward", &y.as_vec(), &c.y, 1e-12);
        let g = dev.tensor_from_vec(c.g.clone(), *y.shape());
        let grads = (y * g).sum::<Rank0, _>().backward();
        assert_close("global grad x", &grads.get(&x).as_vec(), &c.grad_x, 1e-12);
        assert_eq!(<GlobalAvgPool as LayerInfo>::PARAMS, 0);
        let empty: Tensor<(usize, Const<3>, usize, usize), f64, _> =
            dev.zeros_like(&(0, Const, 4, 5));
        assert_eq!(GlobalAvgPool.forward(empty).shape(), &(0, Const::<3>));
    }

    /// Central differences for every input value.
    fn gradcheck<const C: usize, L>(layer: L, x: &Tensor<Img<C>, f64, Dev>, name: &str)
    where
        L: Module<
            Tensor<Img<C>, f64, Dev, OwnedTape<f64, Dev>>,
            Output = Tensor<Img<C>, f64, Dev, OwnedTape<f64, Dev>>,
            Error = ModelError,
        >,
    {
        both_paths(name, |label| {
            let report = check_input_grads(x, |x| {
                let y = layer.try_forward(x).unwrap();
                let n = y.shape().num_elements();
                let w: Vec<f64> = (0..n).map(|i| 0.5 + (i % 5) as f64 * 0.25).collect();
                let w = y.device().tensor_from_vec(w, *y.shape());
                (y.with_empty_tape().square() + y * w).sum::<Rank0, _>()
            });
            assert!(report.max_abs_err <= 1e-6, "{label}: {report}");
            eprintln!("{label}: {report}");
        });
    }

    #[test]
    fn gradients_match_central_differences() {
        let dev = Dev::default();
        // Distinct values 0.01 apart in a scrambled order (37 is prime to 180), so that no
        // window has a near-tie that a step of 1e-6 could flip.
        let v: Vec<f64> = (0..180)
            .map(|i| ((i * 37) % 180) as f64 * 0.01 - 0.9)
            .collect();
        let x = dev.tensor_from_vec(v, (2, Const::<3>, 5, 6));
        gradcheck(MaxPool2d::<3, 2, 1>::default(), &x, "max pool 3/2/1");
        gradcheck(MaxPool2d::<2, 1>::default(), &x, "max pool 2/1");
        gradcheck(AvgPool2d::<3, 2, 1>::default(), &x, "avg pool 3/2/1");
        gradcheck(AvgPool2d::<2>::default(), &x, "avg pool 2");
        let report = check_input_grads(&x, |x| GlobalAvgPool.forward(x).square().sum::<Rank0, _>());
        assert!(report.max_abs_err <= 1e-6, "global: {report}");
        eprintln!("global avg pool: {report}");
    }

    #[test]
    fn max_pool_pads_with_minus_infinity_and_avg_pool_with_zero() {
        let dev = Dev::default();
        let x: Tensor<Rank4<1, 1, 2, 2>, f64, _> = dev.tensor([[[[-1.0, -2.0], [-3.0, -4.0]]]]);
        both_paths("padding", |_| {
            let y = MaxPool2d::<2, 1, 1>::default()
                .try_forward(x.clone())
                .unwrap();
            assert_eq!(
                y.as_vec(),
                [-1.0, -1.0, -2.0, -1.0, -1.0, -2.0, -3.0, -3.0, -4.0]
            );
            let y = AvgPool2d::<2, 1, 1>::default()
                .try_forward(x.clone())
                .unwrap();
            assert_eq!(y.as_vec()[0], -0.25);
        });
    }

    #[test]
    fn declared_and_runtime_sizes() {
        let dev = Dev::default();
        let x: Tensor<Rank4<2, 3, 7, 6>, f32, _> = dev.sample_normal();
        let y: Tensor<Rank4<2, 3, 4, 3>, f32, _> =
            MaxPool2d::<3, 2, 1, Const<4>, Const<3>>::default()
                .try_forward(x.clone())
                .unwrap();
        let free = MaxPool2d::<3, 2, 1>::default()
            .try_forward(x.clone())
            .unwrap();
        assert_eq!(free.shape(), &(Const::<2>, Const::<3>, 4, 3));
        assert_eq!(free.as_vec(), y.as_vec());
        let err = MaxPool2d::<3, 2, 1, Const<3>, Const<3>>::default()
            .try_forward(x.clone())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MaxPool2d<3> (stride 2, padding 1)")
                && err.contains("input height of 7 gives an output height of 4")
                && err.contains("`Const<3>`"),
            "{err}"
        );
        let tiny: Tensor<(usize, Const<3>, usize, usize), f32, _> =
            dev.zeros_like(&(1, Const, 1, 6));
        let err = AvgPool2d::<3>::default()
            .try_forward(tiny)
            .map(|_| ())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("AvgPool2d<3> (stride 3, padding 0): the input height 1"),
            "{err}"
        );
        let empty: Tensor<(usize, Const<3>, usize, usize), f32, _> =
            dev.zeros_like(&(0, Const, 7, 6));
        both_paths("empty batch", |_| {
            let y = MaxPool2d::<3, 2, 1>::default()
                .try_forward(empty.clone())
                .unwrap();
            assert_eq!(y.shape(), &(0, Const::<3>, 4, 3));
            let y = AvgPool2d::<2>::default()
                .try_forward(empty.clone())
                .unwrap();
            assert_eq!(y.shape(), &(0, Const::<3>, 3, 3));
        });
        assert_eq!(<MaxPool2d<2> as LayerInfo>::PARAMS, 0);
        let built = dev.build_module::<AvgPool2d<2>, f32>();
        assert_eq!(NumParams::<f32, Dev>::num_trainable_params(&built), 0);
    }
}
