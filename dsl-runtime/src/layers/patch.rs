//! The patch embedding of a Vision Transformer: non-overlapping `P`×`P` patches, each projected
//! to a `D`-wide token.

use super::conv::{empty_output, gather_windows, Conv2d, Conv2dModule, Taps};
use super::LayerInfo;
use crate::{Elem, Error};
use dfdx::nn::{
    BuildModule, BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection,
};
use dfdx::shapes::{Axes2, Axis, Const, Dim, Dtype, HasShape};
use dfdx::tensor::{HasErr, Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, Device, PermuteTo, ReshapeTo, TryAdd, TryMatMul};
use std::marker::PhantomData;

/// A Vision Transformer's patch embedding (<https://arxiv.org/abs/2010.11929>): the image is cut
/// into non-overlapping `P`×`P` patches, and each patch, with its `C` channels, is projected to a
/// `D`-wide token. This is a convolution with kernel and stride `P` from `C` to `D` channels,
/// whose patch grid is then flattened row by row into a sequence.
///
/// `y[b, n, d] = bias[d] + Σ_{c, u, v} weight[d, c, u, v] · x[b, c, P·r + u, P·q + v]` for
/// patch `n = r·(W/P) + q`.
///
/// # Shapes
/// `[B, C, H, W] -> [B, N, D]` with `N = (H/P)·(W/P)`; `H` and `W` must be positive multiples of
/// `P`, and `N` is `usize` or a declared `Const<n>`: both are checked at run time
/// ([`Error::Shape`]).
///
/// Parameters: `projection.weight` `[D, C, P, P]` and `projection.bias` `[D]`, the keys of
/// Hugging Face's `ViTPatchEmbeddings` (below `vit.embeddings.patch_embeddings`), initialised as
/// [`Conv2d`]'s.
///
/// PyTorch: `torch.nn.Conv2d(C, D, P, stride=P)(x).flatten(2).transpose(1, 2)`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let embed = dev.build_module::<PatchEmbed<3, 64, 16>, f32>();
/// let x: Tensor<Rank4<2, 3, 224, 224>, f32, _> = dev.zeros();
/// let tokens = embed.try_forward(x)?;
/// assert_eq!(tokens.shape(), &(Const::<2>, 196, Const::<64>));
/// # Ok::<(), neural_arch::Error>(())
/// ```
pub struct PatchEmbed<const C: usize, const D: usize, const P: usize, N = usize>(PhantomData<N>);

impl<const C: usize, const D: usize, const P: usize, N> Default for PatchEmbed<C, D, P, N> {
    fn default() -> Self {
        PatchEmbed(PhantomData)
    }
}
impl<const C: usize, const D: usize, const P: usize, N> Clone for PatchEmbed<C, D, P, N> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<const C: usize, const D: usize, const P: usize, N> Copy for PatchEmbed<C, D, P, N> {}
impl<const C: usize, const D: usize, const P: usize, N> PartialEq for PatchEmbed<C, D, P, N> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<const C: usize, const D: usize, const P: usize, N> Eq for PatchEmbed<C, D, P, N> {}
impl<const C: usize, const D: usize, const P: usize, N> std::fmt::Debug for PatchEmbed<C, D, P, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PatchEmbed<{C}, {D}, {P}>")
    }
}

/// The built [`PatchEmbed`]: the projection is an ordinary [`Conv2dModule`].
#[derive(Debug, Clone)]
pub struct PatchEmbedModule<
    const C: usize,
    const DM: usize,
    const P: usize,
    N,
    E: Dtype,
    D: Storage<E>,
> {
    /// The patch projection: kernel and stride `P`, `C` to `DM` channels, with bias.
    pub projection: Conv2dModule<C, DM, P, P, 0, 1, 1, true, usize, usize, E, D>,
    tokens: PhantomData<N>,
}

impl<const C: usize, const D: usize, const P: usize, N> LayerInfo for PatchEmbed<C, D, P, N> {
    const PARAMS: usize = <Conv2d<C, D, P, P> as LayerInfo>::PARAMS;
}

impl<const C: usize, const DM: usize, const P: usize, N: Dim, E: Elem, D: Device<E>>
    BuildOnDevice<D, E> for PatchEmbed<C, DM, P, N>
{
    type Built = PatchEmbedModule<C, DM, P, N, E, D>;

    fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
        #[allow(clippy::let_unit_value)]
        let () = Conv2d::<C, DM, P, P>::CHECK;
        Self::Built::try_build(device)
    }
}

impl<const C: usize, const DM: usize, const P: usize, N, E: Dtype, D: Storage<E>> NonMutableModule
    for PatchEmbedModule<C, DM, P, N, E, D>
{
}

impl<const C: usize, const DM: usize, const P: usize, N: Dim, E: Elem, D: Device<E>>
    TensorCollection<E, D> for PatchEmbedModule<C, DM, P, N, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = PatchEmbedModule<C, DM, P, N, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            Self::module("projection", |s| &s.projection, |s| &mut s.projection),
            |projection| PatchEmbedModule {
                projection,
                tokens: PhantomData,
            },
        )
    }
}

/// The patches of one example as the rows of a matrix: rows `(r, q)` (patch row, patch column),
/// columns `(c, u, v)` (channel, row and column inside the patch), the layout of the
/// projection's flattened weight. Every tap is inside the image.
#[derive(Debug, Clone, Copy)]
struct Patches {
    /// Input `[C, H, W]`.
    input: (usize, usize, usize),
    p: usize,
}

impl Taps for Patches {
    fn src_len(&self) -> usize {
        let (c, h, w) = self.input;
        c * h * w
    }
    fn len(&self) -> usize {
        self.src_len()
    }
    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize)) {
        let ((c, h, w), p) = (self.input, self.p);
        for r in 0..h / p {
            for q in 0..w / p {
                for ch in 0..c {
                    let corner = (ch * h + r * p) * w + q * p;
                    for u in 0..p {
                        (0..p).for_each(|v| f(corner + u * w + v));
                    }
                }
            }
        }
    }
}

impl<
        const C: usize,
        const DM: usize,
        const P: usize,
        N: Dim,
        B: Dim,
        H: Dim,
        W: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(B, Const<C>, H, W), E, D, T>> for PatchEmbedModule<C, DM, P, N, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, N, Const<DM>), E, D, T>;
    type Error = Error;

    fn try_forward(&self, x: Tensor<(B, Const<C>, H, W), E, D, T>) -> Result<Self::Output, Error> {
        #[allow(clippy::let_unit_value)]
        let () = Conv2d::<C, DM, P, P>::CHECK;
        let (b, _, h, w) = *x.shape();
        let (h, w) = (h.size(), w.size());
        if !h.is_multiple_of(P) || !w.is_multiple_of(P) || h == 0 || w == 0 {
            return Err(Error::Shape(format!(
                "PatchEmbed<{C}, {DM}, {P}>: a {h}×{w} image does not divide into {P}×{P} \
                 patches; its height and width must be positive multiples of {P} (resize or \
                 crop the image, e.g. to {}×{})",
                (h / P).max(1) * P,
                (w / P).max(1) * P
            )));
        }
        let n = (h / P) * (w / P);
        let tokens = N::from_size(n).ok_or_else(|| {
            Error::Shape(format!(
                "PatchEmbed<{C}, {DM}, {P}>: a {h}×{w} image gives {} × {} = {n} patches, but \
                 the layer was declared with `{}` of them; give it the image size the model was \
                 declared for, or declare the count `usize` to accept any",
                h / P,
                w / P,
                super::conv::short_type_name::<N>()
            ))
        })?;
        let (nb, cpp) = (b.size(), C * P * P);
        if nb == 0 {
            return Ok(empty_output(x, (b, tokens, Const::<DM>))?);
        }
        let taps = Patches {
            input: (C, h, w),
            p: P,
        };
        let patches = gather_windows(x, b, taps, None)?.try_reshape_like(&(nb * n, cpp))?;
        let weight = self
            .projection
            .weight
            .retaped::<T>()
            .try_reshape_like(&(Const::<DM>, cpp))?
            .try_permute::<_, Axes2<1, 0>>()?;
        let y = patches.try_matmul(weight)?;
        let y = match &self.projection.bias {
            Some(bias) => {
                let shape = *y.shape();
                y.try_add(
                    bias.retaped::<T>()
                        .try_broadcast_like::<_, Axis<0>>(&shape)?,
                )?
            }
            None => y,
        };
        Ok(y.try_reshape_like(&(b, tokens, Const::<DM>))?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::reference::{assert_close, both_paths, case};
    use crate::gradcheck::{check_input_grads, check_param_grads, named_values};
    use crate::prelude::*;

    type Dev = Cpu;

    #[test]
    fn matches_pytorch_and_hugging_face_layout() {
        let c = case("patch_embed");
        both_paths("patch_embed", |label| {
            let dev = Dev::default();
            let mut m = dev.build_module::<PatchEmbed<3, 4, 2>, f64>();
            assert_eq!(
                m.projection.weight.shape().concrete().to_vec(),
                c.weight_shape
            );
            m.projection.weight.copy_from(&c.weight);
            m.projection
                .bias
                .as_mut()
                .unwrap()
                .copy_from(c.bias.as_ref().unwrap());
            let x = dev.tensor_from_vec(
                c.x.clone(),
                (c.x_shape[0], Const::<3>, c.x_shape[2], c.x_shape[3]),
            );
            let y = m.try_forward(x.leaky_trace()).unwrap();
            assert_eq!(y.shape().concrete().to_vec(), c.y_shape);
            assert_close(&format!("{label} forward"), &y.as_vec(), &c.y, 1e-12);
            let g = dev.tensor_from_vec(c.g.clone(), *y.shape());
            let grads = (y * g).sum::<Rank0, _>().backward();
            assert_close(
                &format!("{label} grad x"),
                &grads.get(&x).as_vec(),
                &c.grad_x,
                1e-12,
            );
            assert_close(
                &format!("{label} grad weight"),
                &grads.get(&m.projection.weight).as_vec(),
                &c.grad_weight,
                1e-12,
            );
            assert_close(
                &format!("{label} grad bias"),
                &grads.get(m.projection.bias.as_ref().unwrap()).as_vec(),
                c.grad_bias.as_ref().unwrap(),
                1e-12,
            );
        });
    }

    #[test]
    fn gradients_match_central_differences() {
        let dev = Dev::seed_from_u64(5);
        let m = dev.build_module::<PatchEmbed<2, 3, 2>, f64>();
        let x: Tensor<(usize, Const<2>, usize, usize), f64, _> =
            dev.sample_normal_like(&(2, Const, 4, 6));
        let loss = |y: Tensor<(usize, usize, Const<3>), f64, Dev, OwnedTape<f64, Dev>>| {
            let n = y.shape().num_elements();
            let w: Vec<f64> = (0..n).map(|i| 0.2 + (i % 9) as f64 * 0.1).collect();
            let w = y.device().tensor_from_vec(w, *y.shape());
            (y.with_empty_tape().square() + y * w).sum::<Rank0, _>()
        };
        both_paths("patch embed", |label| {
            let mut m = m.clone();
            let report = check_param_grads(&mut m, |m, grads| {
                loss(m.try_forward(x.trace(grads)).unwrap())
            });
            assert_eq!(report.checked, PatchEmbed::<2, 3, 2>::PARAMS);
            assert!(report.max_abs_err <= 1e-6, "{label} parameters: {report}");
            eprintln!("{label} parameters: {report}");
            let report = check_input_grads(&x, |x| loss(m.try_forward(x).unwrap()));
            assert!(report.max_abs_err <= 1e-6, "{label} input: {report}");
            eprintln!("{label} input: {report}");
        });
    }

    #[test]
    fn params_names_and_shape_errors() {
        let dev = Dev::default();
        let m = dev.build_module::<PatchEmbed<3, 8, 4, Const<6>>, f32>();
        assert_eq!(PatchEmbed::<3, 8, 4>::PARAMS, 8 * 3 * 16 + 8);
        assert_eq!(m.num_trainable_params(), PatchEmbed::<3, 8, 4>::PARAMS);
        let mut m64 = m.clone().to_dtype::<f64>();
        let names: Vec<String> = named_values(&mut m64).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["projection.weight", "projection.bias"]);
        let x: Tensor<Rank4<1, 3, 8, 12>, f32, _> = dev.sample_normal();
        let y: Tensor<Rank3<1, 6, 8>, f32, _> = m.try_forward(x).unwrap();
        assert_eq!(y.shape().concrete(), [1, 6, 8]);
        let odd: Tensor<(usize, Const<3>, usize, usize), f32, _> =
            dev.zeros_like(&(1, Const, 8, 10));
        let err = m.try_forward(odd).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("PatchEmbed<3, 8, 4>: a 8×10 image does not divide into 4×4"),
            "{err}"
        );
        let empty: Tensor<(usize, Const<3>, usize, usize), f32, _> =
            dev.zeros_like(&(0, Const, 8, 12));
        assert_eq!(
            m.try_forward(empty).unwrap().shape(),
            &(0, Const::<6>, Const::<8>)
        );
        let other: Tensor<(usize, Const<3>, usize, usize), f32, _> =
            dev.zeros_like(&(1, Const, 8, 8));
        let err = m.try_forward(other).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("2 × 2 = 4 patches") && err.contains("`Const<6>`"),
            "{err}"
        );
    }
}
