//! Rotary position embedding (RoPE).
#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use super::LayerInfo;
use crate::Elem;
use dfdx::nn::{Module, NonMutableModule, ZeroSizedModule};
use dfdx::shapes::{Axes2, Axis, Const, Dim, HasShape};
use dfdx::tensor::{Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, Device, ReshapeTo, Roll, TryAdd, TryMul};

/// Rotary position embedding (Su et al., RoFormer, <https://arxiv.org/abs/2104.09864>) as
/// Hugging Face's Llama applies it: each head vector of width `HD` at position `p` is rotated,
/// pair `(i, i + HD/2)` by the angle `p·θ^(−2i/HD)`, `θ = THETA` (10000 by default; Llama 3 uses
/// 500000):
///
/// `y = x·cos(pω) + rotate_half(x)·sin(pω)`, `rotate_half([x₁, x₂]) = [−x₂, x₁]` (halves of the
/// last dimension), `ω = [ω₀ … ω_{HD/2−1}, ω₀ … ω_{HD/2−1}]`, `ωᵢ = θ^(−2i/HD)`.
///
/// Query–key products then depend only on the distance between positions. No parameters;
/// `HD` must be even (a compile-time assertion). The angles are computed in `f64` on the host
/// for each call (`S·HD/2` sines and cosines), then converted to the element type, so `f16`
/// models get exact tables at any position.
///
/// The position axis is the second-to-last. Given `(x, offset)` the positions are
/// `offset..offset + S` (tokens after a cached prefix); given `x`, `0..S`.
///
/// # Shapes
/// `x: [B, N, S, HD]`, `[B, S, HD]` or `[S, HD]` (or `(x, offset: usize)`) → same shape.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let x = dev.tensor([[1.0f64, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]);
/// // Position 1: the first pair rotates by 1 radian, the second by 1/100.
/// let y = Rope::<4>.forward((x, 1)).array();
/// assert!((y[0][0] - 1f64.cos()).abs() < 1e-12 && (y[0][2] - 1f64.sin()).abs() < 1e-12);
/// ```
///
/// PyTorch (Hugging Face `transformers`): `apply_rotary_pos_emb(q, k, cos, sin)` with the `cos`,
/// `sin` of `LlamaRotaryEmbedding(dim=HD, base=THETA)`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rope<const HD: usize, const THETA: usize = 10000>;

impl<const HD: usize, const THETA: usize> Rope<HD, THETA> {
    const TYPE_CHECK: () = assert!(
        HD > 0 && HD.is_multiple_of(2),
        "Rope<HD>: RoPE rotates pairs of values, so the head width HD must be even"
    );
}

impl<const HD: usize, const THETA: usize> ZeroSizedModule for Rope<HD, THETA> {}
impl<const HD: usize, const THETA: usize> NonMutableModule for Rope<HD, THETA> {}
impl<const HD: usize, const THETA: usize> LayerInfo for Rope<HD, THETA> {
    const PARAMS: usize = 0;
}

/// `cos(pω)` and `sin(pω)·[−1 … −1, 1 … 1]` for positions `offset..offset + s`: `(s, hd)` each.
/// The sign folds `rotate_half`'s negation into the table, so that `rotate_half(x)·sin` is a
/// roll of `x` by `hd/2` times the signed table.
fn tables<S: Dim, Hd: Dim, E: Elem, D: Device<E>>(
    dev: &D,
    (s, hd): (S, Hd),
    offset: usize,
    theta: f64,
) -> Result<(Tensor<(S, Hd), E, D>, Tensor<(S, Hd), E, D>), D::Err> {
    let (n, w) = (s.size(), hd.size());
    let half = w / 2;
    let mut cos = Vec::with_capacity(n * w);
    let mut sin = Vec::with_capacity(n * w);
    for p in offset..offset + n {
        for i in 0..w {
            let j = i % half.max(1);
            let angle = p as f64 * theta.powf(-2.0 * j as f64 / w as f64);
            cos.push(crate::layers::attention::elem::<E>(angle.cos()));
            let sign = if i < half { -1.0 } else { 1.0 };
            sin.push(crate::layers::attention::elem::<E>(sign * angle.sin()));
        }
    }
    Ok((
        dev.try_tensor_from_vec(cos, (s, hd))?,
        dev.try_tensor_from_vec(sin, (s, hd))?,
    ))
}

/// RoPE on `(B, N, S, hd)` at positions `offset..offset + S`, for any even `hd`.
pub(crate) fn apply_rope<B, N, S, Hd, E, D, T>(
    x: Tensor<(B, N, S, Hd), E, D, T>,
    offset: usize,
    theta: f64,
) -> Result<Tensor<(B, N, S, Hd), E, D, T>, D::Err>
where
    B: Dim,
    N: Dim,
    S: Dim,
    Hd: Dim,
    E: Elem,
    D: Device<E>,
    T: Tape<E, D>,
{
    let shape = *x.shape();
    let (cos, sin) = tables::<S, Hd, E, D>(x.device(), (shape.2, shape.3), offset, theta)?;
    let cos = cos.try_broadcast_like::<_, Axes2<0, 1>>(&shape)?;
    let sin = sin.try_broadcast_like::<_, Axes2<0, 1>>(&shape)?;
    // roll by hd/2 puts [x₂, x₁] in place of [x₁, x₂]; the table carries the sign. (A roll
    // rather than slices: dfdx's slice backward overwrites the input's gradient instead of
    // adding to it, which would lose the gradient of any other use of `x`.)
    let rotated = x
        .retaped::<T>()
        .try_roll::<Axis<3>>(shape.3.size() / 2)?
        .try_mul(sin)?;
    x.try_mul(cos)?.try_add(rotated)
}

macro_rules! rope_rank {
    ([$($d:ident),*], |$x:ident, $offset:ident| $body:expr) => {
        impl<const HD: usize, const THETA: usize, $($d: Dim,)* E: Elem, D: Device<E>, T: Tape<E, D>>
            Module<(Tensor<($($d,)* Const<HD>), E, D, T>, usize)> for Rope<HD, THETA>
        {
            type Output = Tensor<($($d,)* Const<HD>), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                ($x, $offset): (Tensor<($($d,)* Const<HD>), E, D, T>, usize),
            ) -> Result<Self::Output, D::Err> {
                let () = Self::TYPE_CHECK;
                $body
            }
        }

        impl<const HD: usize, const THETA: usize, $($d: Dim,)* E: Elem, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($d,)* Const<HD>), E, D, T>> for Rope<HD, THETA>
        {
            type Output = Tensor<($($d,)* Const<HD>), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<($($d,)* Const<HD>), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                self.try_forward((x, 0))
            }
        }
    };
}
// Lower ranks gain unit axes for the shared rank-4 code; the reshapes are views of contiguous
// inputs.
rope_rank!([S], |x, offset| {
    let s = *x.shape();
    let x = x.try_reshape_like(&(Const::<1>, Const::<1>, s.0, Const::<HD>))?;
    apply_rope(x, offset, THETA as f64)?.try_reshape_like(&s)
});
rope_rank!([B, S], |x, offset| {
    let s = *x.shape();
    let x = x.try_reshape_like(&(s.0, Const::<1>, s.1, Const::<HD>))?;
    apply_rope(x, offset, THETA as f64)?.try_reshape_like(&s)
});
rope_rank!([B, N, S], |x, offset| apply_rope(x, offset, THETA as f64));

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_input_grads;
    use crate::layers::attention::reference::{assert_close, case};
    use crate::prelude::*;

    type Dev = Cpu;

    #[test]
    fn matches_hugging_face_rotate_half() {
        let dev = Dev::default();
        let c = case("rope");
        assert_eq!((c.config("hd"), c.config("offset")), (4, 0));
        let x = c.tensor(&dev, "x", (Const::<2>, Const::<2>, Const::<3>, Const::<4>));
        let g = dev.tensor_from_vec(c.g(), *x.shape());
        assert_close("y", &Rope::<4>.forward(x.clone()).as_vec(), &c.y(), 1e-12);
        let grads = (Rope::<4>.forward(x.leaky_trace()) * g)
            .sum::<Rank0, _>()
            .backward();
        assert_close("grad x", &grads.get(&x).as_vec(), &c.grad("x"), 1e-12);

        let c = case("rope_offset");
        assert_eq!((c.config("hd"), c.config("offset")), (6, 5));
        let x = c.tensor(&dev, "x", (Const::<1>, Const::<2>, Const::<3>, Const::<6>));
        assert_close(
            "y at offset 5",
            &Rope::<6>.forward((x, 5)).as_vec(),
            &c.y(),
            1e-12,
        );
    }

    #[test]
    fn an_offset_continues_the_positions() {
        let dev = Dev::seed_from_u64(1);
        let x: Tensor<Rank3<2, 5, 6>, f64, Dev> = dev.sample_normal();
        let whole = Rope::<6, 500000>.forward(x.clone());
        let tail = Rope::<6, 500000>.forward((x.slice((.., 2..5, ..)), 2));
        assert_close(
            "positions 2..5",
            &tail.as_vec(),
            &whole.slice((.., 2..5, ..)).as_vec(),
            1e-15,
        );
    }

    #[test]
    fn scores_depend_only_on_the_distance() {
        let dev = Dev::seed_from_u64(2);
        let q: Tensor<Rank2<1, 8>, f64, Dev> = dev.sample_normal();
        let k: Tensor<Rank2<1, 8>, f64, Dev> = dev.sample_normal();
        let score = |pq: usize, pk: usize| {
            let a = Rope::<8>.forward((q.clone(), pq)).as_vec();
            let b = Rope::<8>.forward((k.clone(), pk)).as_vec();
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>()
        };
        assert!((score(5, 2) - score(13, 10)).abs() < 1e-12);
        assert!((score(0, 0) - score(7, 7)).abs() < 1e-12);
        // Rotation keeps the norm.
        let n = |v: Vec<f64>| v.iter().map(|x| x * x).sum::<f64>();
        assert!((n(Rope::<8>.forward((q.clone(), 9)).as_vec()) - n(q.as_vec())).abs() < 1e-12);
    }

    #[test]
    fn gradients_match_central_differences() {
        let dev = Dev::seed_from_u64(3);
        let x: Tensor<Rank4<2, 2, 3, 4>, f64, Dev> = dev.sample_normal();
        let g: Tensor<Rank4<2, 2, 3, 4>, f64, Dev> = dev.sample_normal();
        // `x` used twice: the rotation's gradient must add to the other use's.
        let report = check_input_grads(&x, |x| {
            let y = Rope::<4>.forward((x.retaped(), 3));
            ((y + x) * g.clone()).sum()
        });
        assert!(report.max_abs_err <= 1e-6, "{report}");
        eprintln!("rope input: {report}");
        assert_eq!(<Rope<4> as LayerInfo>::PARAMS, 0);
    }
}
