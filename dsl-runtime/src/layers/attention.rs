//! Multi-head attention written from dfdx ops: self-attention (optionally with a padding mask),
//! cross-attention, and the shared pieces of the causal and grouped-query variants
//! ([`super::CausalSelfAttention`], [`super::GqaAttention`]): the scaled dot-product core, the
//! key/value cache, and projections whose widths are products of const parameters.
//!
//! dfdx's own `MultiHeadAttention` has no mask and takes keys and values without a gradient
//! tape; everything here works for any tape, so the same module runs in inference and training,
//! and the gradient reaches every parameter and every input.
#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use super::cpu_fast::fused_stored;
use super::fused_attention::{attend_cpu, attend_merged_cpu};
use super::linear::uniform_init;
use super::LinearModule;
use super::{linear, LayerInfo, Mask};
use crate::{Elem, Error};
use dfdx::nn::{
    BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection, TensorOptions,
};
use dfdx::shapes::{Axes2, Axes4, Axis, Const, ConstDim, Dim, Dtype, HasShape, Shape};
use dfdx::tensor::{HasErr, Storage, Tape, Tensor};
use dfdx::tensor_ops::{
    BroadcastTo, ChooseFrom, Device, PermuteTo, RealizeTo, ReshapeTo, TryConcatAlong, TryMatMul,
    TryMul, TryNe,
};

// ---------------------------------------------------------------------------------------------
// The core: scaled dot-product attention over heads, with an optional boolean mask.
// ---------------------------------------------------------------------------------------------

/// `E` from an `f64` constant (a scale, an init bound): every `Elem` represents these.
pub(crate) fn elem<E: Elem>(x: f64) -> E {
    <E as num_traits::NumCast>::from(x).unwrap_or_else(E::nan)
}

/// Which scores of `S` = `(B, G, N, T)` an attention may use.
pub(crate) enum Keep<S: Shape, D: Storage<bool>> {
    /// Where the flags are true.
    Flags(Tensor<S, bool, D>),
    /// Causal over a cache of `past` positions: the `N` rows of each head group are blocks of
    /// `queries` consecutive positions (one block per query head of the group), and the query
    /// at position `p` of its block sees the keys `0..=past + p`.
    Causal {
        /// Queries per head.
        queries: usize,
        /// Cached positions before the first query.
        past: usize,
    },
}

/// `softmax(q kᵀ / √hd) v` per batch entry and head group, for `q` `(B, G, N, hd)` and `k`, `v`
/// `(B, G, T, hd)`: `(B, G, N, hd)`.
///
/// Where `keep` is false the score is replaced by the most negative finite value before the
/// softmax: −∞ in effect (its exponential underflows to exactly 0 next to any kept score), but a
/// row whose keys are all masked stays finite instead of `0/0 = NaN`. With `empty_rows`, the
/// weights are masked once more after the softmax, which zeroes exactly those rows (the kept
/// weights of other rows are unchanged and the masked ones are 0 already): such a query attends
/// to nothing and contributes 0, as PyTorch's `scaled_dot_product_attention` does.
pub(crate) fn attend<B, G, N, T, Hd, E, D, Tp>(
    q: Tensor<(B, G, N, Hd), E, D, Tp>,
    k: Tensor<(B, G, T, Hd), E, D, Tp>,
    v: Tensor<(B, G, T, Hd), E, D, Tp>,
    keep: Option<Keep<(B, G, N, T), D>>,
    empty_rows: bool,
) -> Result<Tensor<(B, G, N, Hd), E, D, Tp>, D::Err>
where
    B: Dim,
    G: Dim,
    N: Dim,
    T: Dim,
    Hd: Dim,
    E: Elem,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    let (b, g, n, hd) = *q.shape();
    let sizes = [b.size(), g.size(), n.size(), k.shape().2.size(), hd.size()];
    if fused_stored::<E, D>() && !sizes.contains(&0) {
        // One CPU kernel: products, masked softmax and weighted sum per (batch, group) block,
        // the blocks in parallel. dfdx makes about ten passes over the scores, each into a new
        // buffer, and its batched products run one block at a time.
        let mask = keep.map(|keep| match keep {
            Keep::Flags(keep) => Mask::Flags {
                keep: keep.as_vec(),
                empty_rows_zero: empty_rows,
            },
            Keep::Causal { queries, past } => Mask::Causal { queries, past },
        });
        return attend_cpu(q, k, v, mask);
    }
    // Scaling q rather than the scores: N·hd multiplications instead of N·T.
    let scale = elem::<E>(1.0 / (hd.size() as f64).sqrt());
    let kt = k.try_permute::<_, Axes4<0, 1, 3, 2>>()?;
    let scores = q.try_mul(scale)?.try_matmul(kt)?;
    let keep = match keep {
        None => None,
        Some(Keep::Flags(keep)) => Some(keep),
        Some(Keep::Causal { queries, past }) => {
            let (b, g, n, t) = *scores.shape();
            let tri: Tensor<(usize, usize, usize), E, D> = scores.device().try_lower_tri_like(
                &(n.size() / queries, queries, t.size()),
                E::ONE,
                past as isize,
            )?;
            let keep = tri
                .try_reshape_like(&(n, t))?
                .try_ne(E::default())?
                .try_broadcast_like::<_, Axes2<0, 1>>(&(b, g, n, t))?;
            Some(keep)
        }
    };
    let weights = match keep {
        None => scores.try_softmax::<Axis<3>>()?,
        Some(keep) => {
            let shape = *scores.shape();
            let dev = scores.device().clone();
            let fill = dev
                .try_tensor_from_vec(vec![E::min_value()], ())?
                .try_broadcast_like::<_, Axes4<0, 1, 2, 3>>(&shape)?;
            let w = keep
                .clone()
                .try_choose(scores, fill)?
                .try_softmax::<Axis<3>>()?;
            if empty_rows {
                let zero = dev
                    .try_zeros_like(&())?
                    .try_broadcast_like::<_, Axes4<0, 1, 2, 3>>(&shape)?;
                keep.try_choose(w, zero)?
            } else {
                w
            }
        }
    };
    weights.try_matmul(v)
}

/// `(B, S, W)` to `(B, heads, S, W/heads)`: a reshape and a permutation, no copy.
pub(crate) fn split_heads<B: Dim, S: Dim, W: Dim, E: Dtype, D: Device<E>, Tp: Tape<E, D>>(
    x: Tensor<(B, S, W), E, D, Tp>,
    heads: usize,
) -> Result<Tensor<(B, usize, S, usize), E, D, Tp>, D::Err> {
    let (b, s, w) = *x.shape();
    x.try_reshape_like(&(b, s, heads, w.size() / heads))?
        .try_permute::<_, Axes4<0, 2, 1, 3>>()
}

/// `(B, heads, S, hd)` to `(B, S, w)` with `w = heads·hd`: the heads side by side again.
pub(crate) fn merge_heads<B: Dim, S: Dim, W: Dim, E: Dtype, D: Device<E>, Tp: Tape<E, D>>(
    x: Tensor<(B, usize, S, usize), E, D, Tp>,
    w: W,
) -> Result<Tensor<(B, S, W), E, D, Tp>, D::Err> {
    let (b, _, s, _) = *x.shape();
    x.try_permute::<_, Axes4<0, 2, 1, 3>>()?
        .try_reshape_like(&(b, s, w))
}

/// [`attend`] over `heads` heads side by side, as the projections write them: `q`
/// `(B, S, H·hd)`, `k` `(B, T, H·hd)` and `v` `(B, T, H·hv)` to `(B, S, H·hv)`, the heads
/// merged again. `keep` is `(B, H, S, T)`; rows with nothing kept become 0 when `empty_rows`.
pub(crate) fn attend_heads<B, S, T, Wq, Wv, E, D, Tp>(
    q: Tensor<(B, S, Wq), E, D, Tp>,
    k: Tensor<(B, T, Wq), E, D, Tp>,
    v: Tensor<(B, T, Wv), E, D, Tp>,
    heads: usize,
    keep: Option<Tensor<(B, usize, S, T), bool, D>>,
    empty_rows: bool,
) -> Result<Tensor<(B, S, Wv), E, D, Tp>, D::Err>
where
    B: Dim,
    S: Dim,
    T: Dim,
    Wq: Dim,
    Wv: Dim,
    E: Elem,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    let (b, s, wq) = *q.shape();
    let wv = v.shape().2;
    let sizes = [b.size(), s.size(), k.shape().1.size(), wq.size(), wv.size()];
    if fused_stored::<E, D>() && !sizes.contains(&0) {
        let mask = keep.map(|keep| Mask::Flags {
            keep: keep.as_vec(),
            empty_rows_zero: empty_rows,
        });
        return attend_merged_cpu(q, k, v, heads, mask);
    }
    let (q, k, v) = (
        split_heads(q, heads)?,
        split_heads(k, heads)?,
        split_heads(v, heads)?,
    );
    let o = attend(q, k, v, keep.map(Keep::Flags), empty_rows)?;
    merge_heads(o, wv)
}

/// Causal attention of the queries `q` `(B, H, S, hd)`, at positions `past..past + S`, over the
/// keys and values `(B, G, T, hd)` at positions `0..T`, with `G | H` key/value heads (query head
/// `h` reads key/value head `h / (H/G)`, as Hugging Face's `repeat_kv` arranges them). Returns
/// the heads merged, `(B, S, w)`.
///
/// The `H/G` query heads that share a key/value head are stacked along the rows, `(B, G,
/// (H/G)·S, hd)`, so the shared keys enter one matrix product instead of being copied `H/G`
/// times; the causal mask repeats per stacked head.
pub(crate) fn causal_attend<B, S, T, W, E, D, Tp>(
    q: Tensor<(B, usize, S, usize), E, D, Tp>,
    k: Tensor<(B, usize, T, usize), E, D, Tp>,
    v: Tensor<(B, usize, T, usize), E, D, Tp>,
    past: usize,
    w: W,
) -> Result<Tensor<(B, S, W), E, D, Tp>, D::Err>
where
    B: Dim,
    S: Dim,
    T: Dim,
    W: Dim,
    E: Elem,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    let (b, h, s, hd) = *q.shape();
    let g = k.shape().1;
    let r = h / g;
    let rows = r * s.size();
    let q = if r == 1 {
        // Same values, rows typed `usize`: no copy of a permuted view.
        match q.try_realize::<(B, usize, usize, usize)>() {
            Ok(q) => q,
            Err(q) => q.try_reshape_like(&(b, g, rows, hd))?,
        }
    } else {
        q.try_reshape_like(&(b, g, rows, hd))?
    };
    // One new query sees every key; longer blocks need the triangle, shifted by the cache.
    let keep = (s.size() > 1).then_some(Keep::Causal {
        queries: s.size(),
        past,
    });
    attend(q, k, v, keep, false)?
        .try_reshape_like(&(b, h, s, hd))?
        .try_permute::<_, Axes4<0, 2, 1, 3>>()?
        .try_reshape_like(&(b, s, w))
}

// ---------------------------------------------------------------------------------------------
// Key/value cache.
// ---------------------------------------------------------------------------------------------

type Dyn4 = (usize, usize, usize, usize);

/// The keys and values one causal attention layer has seen, for generation: each
/// `forward_cached` call appends the new tokens' keys and values (after RoPE, where the layer
/// applies it) and attends over all of them, so a token costs one row instead of a whole
/// sequence. Use one cache per layer and per batch of sequences; [`KvCache::clear`] starts over.
///
/// Keys and values are kept as `(B, G, T, hd)` (batch, key/value heads, positions, head width).
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let attn = dev.build_module::<CausalSelfAttention<8, 2>, f32>();
/// let mut cache = KvCache::new();
/// let prompt: Tensor<Rank3<1, 4, 8>, f32, _> = dev.sample_normal();
/// attn.try_forward_cached(prompt, &mut cache)?;
/// let next: Tensor<Rank3<1, 1, 8>, f32, _> = dev.sample_normal();
/// let y = attn.try_forward_cached(next, &mut cache)?;
/// assert_eq!((cache.len(), y.shape().1), (5, Const::<1>));
/// # Ok::<(), ModelError>(())
/// ```
#[derive(Debug, Clone)]
pub struct KvCache<E: Dtype, D: Storage<E>> {
    kv: Option<(Tensor<Dyn4, E, D>, Tensor<Dyn4, E, D>)>,
}

impl<E: Dtype, D: Storage<E>> Default for KvCache<E, D> {
    fn default() -> Self {
        KvCache { kv: None }
    }
}

impl<E: Dtype, D: Storage<E>> KvCache<E, D> {
    /// An empty cache: the next call starts at position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of positions cached: the position the next token gets.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.shape().2)
    }

    /// Whether no position is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.kv = None;
    }

    /// The cached keys and values, `(B, G, T, hd)` each.
    pub fn keys_values(&self) -> Option<(&Tensor<Dyn4, E, D>, &Tensor<Dyn4, E, D>)> {
        self.kv.as_ref().map(|(k, v)| (k, v))
    }
}

impl<E: Elem, D: Device<E>> KvCache<E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    /// Appends the new tokens' keys and values `(B, G, S, hd)` and returns all of them.
    pub(crate) fn extend<B: Dim, S: Dim>(
        &mut self,
        layer: &str,
        k: Tensor<(B, usize, S, usize), E, D>,
        v: Tensor<(B, usize, S, usize), E, D>,
    ) -> Result<
        (
            Tensor<(B, usize, usize, usize), E, D>,
            Tensor<(B, usize, usize, usize), E, D>,
        ),
        Error,
    > {
        let shape = *k.shape();
        let (b, g, s, hd) = (shape.0.size(), shape.1, shape.2.size(), shape.3);
        let (k, v) = (to_dyn(k)?, to_dyn(v)?);
        // The cache changes only once the new keys fit: a refused call leaves it as it was.
        let (k, v) = match &self.kv {
            None => (k, v),
            Some((ck, cv)) => {
                let (cb, cg, ct, chd) = *ck.shape();
                if (cb, cg, chd) != (b, g, hd) {
                    return Err(Error::Shape(format!(
                        "{layer}: the KvCache holds {ct} positions of {cb} sequences × {cg} \
                         key/value heads × {chd} values, but this call brings {s} positions of \
                         {b} × {g} × {hd}; use one KvCache per layer and per batch of \
                         sequences, and clear() it before starting new ones"
                    )));
                }
                (
                    (ck.clone(), k).try_concat_along(Axis::<2>)?,
                    (cv.clone(), v).try_concat_along(Axis::<2>)?,
                )
            }
        };
        let batch = |t: Tensor<Dyn4, E, D>| {
            t.try_realize::<(B, usize, usize, usize)>().map_err(|t| {
                Error::Shape(format!(
                    "{layer}: the cached keys have batch size {}, which does not fit the \
                     input's batch type",
                    t.shape().0
                ))
            })
        };
        let all = (batch(k.clone())?, batch(v.clone())?);
        self.kv = Some((k, v));
        Ok(all)
    }
}

fn to_dyn<B: Dim, S: Dim, E: Dtype, D: Device<E>>(
    t: Tensor<(B, usize, S, usize), E, D>,
) -> Result<Tensor<Dyn4, E, D>, D::Err> {
    match t.try_realize::<Dyn4>() {
        Ok(t) => Ok(t),
        Err(t) => {
            let s = t.shape().concrete();
            t.try_reshape_like(&(s[0], s[1], s[2], s[3]))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Projections whose widths are products of const parameters.
// ---------------------------------------------------------------------------------------------

/// The dimension `A·B`, fixed at compile time: what `Const<{A * B}>` would be if stable Rust
/// allowed const expressions in types. It is a `ConstDim`, so a tensor shaped with it is a
/// `ConstShape` that dfdx can build, save and load like any other (`c_attn.weight` of
/// `CausalSelfAttention<M, H>` is `(ConstProd<3, M>, Const<M>)`, saved as `[3M, M]`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConstProd<const A: usize, const B: usize>;

impl<const A: usize, const B: usize> Dim for ConstProd<A, B> {
    fn size(&self) -> usize {
        A * B
    }
    fn from_size(size: usize) -> Option<Self> {
        (size == A * B).then_some(ConstProd)
    }
}

impl<const A: usize, const B: usize> ConstDim for ConstProd<A, B> {
    const SIZE: usize = A * B;
}

/// `y = x Wᵀ + b` from `I` features to `N·P` (`N` heads or fused projections of width `P`):
/// `[*, S, I] -> [*, S, N·P]`, the width typed [`ConstProd<N, P>`]. GPT-2's `c_attn` is `InProj<M, 3,
/// M>`. Parameters `weight` `[N·P, I]` and `bias` `[N·P]`, initialised uniformly in `±1/√I` as
/// PyTorch's `torch.nn.Linear(I, N * P)`.
#[derive(Debug, Clone)]
pub struct InProj<const I: usize, const N: usize, const P: usize, E: Dtype, D: Storage<E>> {
    /// `[N·P, I]`.
    pub weight: Tensor<(ConstProd<N, P>, Const<I>), E, D>,
    /// `[N·P]`.
    pub bias: Tensor<(ConstProd<N, P>,), E, D>,
}

/// `y = x Wᵀ` from `I` features to `N·P`: `[*, S, I] -> [*, S, N·P]`. Llama's `q_proj` is
/// `InProjNoBias<M, H, HD>`. Parameter `weight` `[N·P, I]`. PyTorch: `torch.nn.Linear(I, N * P,
/// bias=False)`.
#[derive(Debug, Clone)]
pub struct InProjNoBias<const I: usize, const N: usize, const P: usize, E: Dtype, D: Storage<E>> {
    /// `[N·P, I]`.
    pub weight: Tensor<(ConstProd<N, P>, Const<I>), E, D>,
}

/// `y = x Wᵀ` from `N·P` features to `O`: `[*, S, N·P] -> [*, S, O]`, the heads merged back.
/// Llama's `o_proj` is `OutProjNoBias<H, HD, M>`. Parameter `weight` `[O, N·P]`. PyTorch:
/// `torch.nn.Linear(N * P, O, bias=False)`.
#[derive(Debug, Clone)]
pub struct OutProjNoBias<const N: usize, const P: usize, const O: usize, E: Dtype, D: Storage<E>> {
    /// `[O, N·P]`.
    pub weight: Tensor<(Const<O>, ConstProd<N, P>), E, D>,
}

impl<const I: usize, const N: usize, const P: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for InProj<I, N, P, E, D>
{
}
impl<const I: usize, const N: usize, const P: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for InProjNoBias<I, N, P, E, D>
{
}
impl<const N: usize, const P: usize, const O: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for OutProjNoBias<N, P, O, E, D>
{
}

impl<const I: usize, const N: usize, const P: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for InProj<I, N, P, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = InProj<I, N, P, E2, D2>;

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
            |(weight, bias)| InProj { weight, bias },
        )
    }
}

impl<const I: usize, const N: usize, const P: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for InProjNoBias<I, N, P, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = InProjNoBias<I, N, P, E2, D2>;

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
            |weight| InProjNoBias { weight },
        )
    }
}

impl<const N: usize, const P: usize, const O: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for OutProjNoBias<N, P, O, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = OutProjNoBias<N, P, O, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            Self::tensor(
                "weight",
                |s| &s.weight,
                |s| &mut s.weight,
                TensorOptions::reset_with(|t| uniform_init(t, N * P)),
            ),
            |weight| OutProjNoBias { weight },
        )
    }
}

impl<
        const I: usize,
        const N: usize,
        const P: usize,
        B: Dim,
        S: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(B, S, Const<I>), E, D, T>> for InProj<I, N, P, E, D>
{
    type Output = Tensor<(B, S, ConstProd<N, P>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, S, Const<I>), E, D, T>) -> Result<Self::Output, D::Err> {
        let (b, s, i) = *x.shape();
        let x = x.try_reshape_like(&(b.size() * s.size(), i))?;
        linear(x, &self.weight, Some(&self.bias))?.try_reshape_like(&(b, s, ConstProd))
    }
}

impl<
        const I: usize,
        const N: usize,
        const P: usize,
        B: Dim,
        S: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(B, S, Const<I>), E, D, T>> for InProjNoBias<I, N, P, E, D>
{
    type Output = Tensor<(B, S, ConstProd<N, P>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, S, Const<I>), E, D, T>) -> Result<Self::Output, D::Err> {
        let (b, s, i) = *x.shape();
        let x = x.try_reshape_like(&(b.size() * s.size(), i))?;
        linear(x, &self.weight, None)?.try_reshape_like(&(b, s, ConstProd))
    }
}

impl<
        const N: usize,
        const P: usize,
        const O: usize,
        B: Dim,
        S: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(B, S, ConstProd<N, P>), E, D, T>> for OutProjNoBias<N, P, O, E, D>
{
    type Output = Tensor<(B, S, Const<O>), E, D, T>;
    type Error = D::Err;
    fn try_forward(
        &self,
        x: Tensor<(B, S, ConstProd<N, P>), E, D, T>,
    ) -> Result<Self::Output, D::Err> {
        let (b, s, i) = *x.shape();
        let x = x.try_reshape_like(&(b.size() * s.size(), i))?;
        linear(x, &self.weight, None)?.try_reshape_like(&(b, s, Const))
    }
}

// ---------------------------------------------------------------------------------------------
// SelfAttention.
// ---------------------------------------------------------------------------------------------

/// Multi-head self-attention (Vaswani et al., <https://arxiv.org/abs/1706.03762>), with an
/// optional padding mask: `[B, S, M] -> [B, S, M]`, `H` heads over query/key width `K` and value
/// width `V` (both `M` by default).
///
/// `Q = x W_qᵀ + b_q`, `K = x W_kᵀ + b_k`, `V = x W_vᵀ + b_v`, split into `H` heads; per head
/// `softmax(Q Kᵀ / √(K/H)) V`; the heads side by side, projected by `w_o`.
///
/// Given `(x, mask)` with `mask: Tensor<(B, S), bool, D>`, `true` marks a key to attend to and
/// `false` a padding key (Hugging Face's `attention_mask` of 1s and 0s, as booleans): padding
/// keys get −∞ before the softmax, as in BERT. A sequence that is all padding gives 0 before
/// `w_o` (so `w_o`'s bias after it), never NaN; outputs at padding query positions are computed
/// but meaningless, as in BERT. A mask of another size is an [`Error::Shape`].
///
/// Parameters `w_q` `[K, M]`, `w_k` `[K, M]`, `w_v` `[V, M]`, `w_o` `[M, V]`, each with a bias
/// (`Linear` layers: `w_q.weight`, `w_q.bias`, ...). `H` must divide `K` and `V`: a compile-time
/// assertion (and `model!` checks it at the declaration).
///
/// # Shapes
/// `x: [B, S, M]` or `[S, M]` → same shape; `(x: [B, S, M], mask: bool [B, S])` → `[B, S, M]`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let attn = dev.build_module::<SelfAttention<8, 2>, f32>();
/// let x: Tensor<Rank3<2, 3, 8>, f32, _> = dev.sample_normal();
/// let y = attn.forward(x.clone());
/// // The second sequence has one real token and two padding tokens.
/// let mask = dev.tensor([[true, true, true], [true, false, false]]);
/// let y_masked = attn.try_forward((x, mask))?;
/// assert_eq!(y.shape(), y_masked.shape());
/// # Ok::<(), ModelError>(())
/// ```
///
/// PyTorch: `torch.nn.MultiheadAttention(M, H, batch_first=True)` called as `attn(x, x, x,
/// key_padding_mask=~mask)`, with `w_q`/`w_k`/`w_v` the thirds of its `in_proj_weight`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SelfAttention<const M: usize, const H: usize, const K: usize = M, const V: usize = M>;

impl<const M: usize, const H: usize, const K: usize, const V: usize> SelfAttention<M, H, K, V> {
    const TYPE_CHECK: () = assert!(
        H > 0 && K.is_multiple_of(H) && V.is_multiple_of(H),
        "SelfAttention<M, H, K, V>: the number of heads H must divide the key width K and the value width V (both M unless given)"
    );
}

/// The built [`SelfAttention`].
#[derive(Debug, Clone)]
pub struct SelfAttentionModule<
    const M: usize,
    const H: usize,
    const K: usize,
    const V: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// Query projection, `[K, M]` and `[K]`.
    pub w_q: LinearModule<M, K, E, D>,
    /// Key projection, `[K, M]` and `[K]`.
    pub w_k: LinearModule<M, K, E, D>,
    /// Value projection, `[V, M]` and `[V]`.
    pub w_v: LinearModule<M, V, E, D>,
    /// Output projection, `[M, V]` and `[M]`.
    pub w_o: LinearModule<V, M, E, D>,
}

impl<const M: usize, const H: usize, const K: usize, const V: usize> LayerInfo
    for SelfAttention<M, H, K, V>
{
    const PARAMS: usize = 2 * (M * K + K) + (M * V + V) + (V * M + M);
    const CHECKS: () = SelfAttention::<M, H, K, V>::TYPE_CHECK;
}

impl<const M: usize, const H: usize, const K: usize, const V: usize, E: Elem, D: Device<E>>
    BuildOnDevice<D, E> for SelfAttention<M, H, K, V>
{
    type Built = SelfAttentionModule<M, H, K, V, E, D>;
    fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
        let () = SelfAttention::<M, H, K, V>::TYPE_CHECK;
        dfdx::nn::BuildModule::try_build(device)
    }
}

impl<const M: usize, const H: usize, const K: usize, const V: usize, E: Dtype, D: Storage<E>>
    NonMutableModule for SelfAttentionModule<M, H, K, V, E, D>
{
}

impl<const M: usize, const H: usize, const K: usize, const V: usize, E: Elem, D: Device<E>>
    TensorCollection<E, D> for SelfAttentionModule<M, H, K, V, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = SelfAttentionModule<M, H, K, V, E2, D2>;

    fn iter_tensors<Vi: ModuleVisitor<Self, E, D>>(
        visitor: &mut Vi,
    ) -> Result<Option<Self::To<Vi::E2, Vi::D2>>, Vi::Err> {
        visitor.visit_fields(
            (
                Self::module("w_q", |s| &s.w_q, |s| &mut s.w_q),
                Self::module("w_k", |s| &s.w_k, |s| &mut s.w_k),
                Self::module("w_v", |s| &s.w_v, |s| &mut s.w_v),
                Self::module("w_o", |s| &s.w_o, |s| &mut s.w_o),
            ),
            |(w_q, w_k, w_v, w_o)| SelfAttentionModule { w_q, w_k, w_v, w_o },
        )
    }
}

impl<const M: usize, const H: usize, const K: usize, const V: usize, E: Elem, D: Device<E>>
    SelfAttentionModule<M, H, K, V, E, D>
{
    fn attention<B: Dim, S: Dim, T: Tape<E, D>>(
        &self,
        x: Tensor<(B, S, Const<M>), E, D, T>,
        mask: Option<Tensor<(B, S), bool, D>>,
    ) -> Result<Tensor<(B, S, Const<M>), E, D, T>, D::Err> {
        let () = SelfAttention::<M, H, K, V>::TYPE_CHECK;
        let (b, s, _) = *x.shape();
        let q = self.w_q.try_forward(x.retaped::<T>())?;
        let k = self.w_k.try_forward(x.retaped::<T>())?;
        let v = self.w_v.try_forward(x)?;
        let keep = match mask {
            Some(m) => Some(m.try_broadcast_like::<_, Axes2<1, 2>>(&(b, H, s, s))?),
            None => None,
        };
        self.w_o.try_forward(attend_heads(q, k, v, H, keep, true)?)
    }
}

impl<
        const M: usize,
        const H: usize,
        const K: usize,
        const V: usize,
        B: Dim,
        S: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(B, S, Const<M>), E, D, T>> for SelfAttentionModule<M, H, K, V, E, D>
{
    type Output = Tensor<(B, S, Const<M>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, S, Const<M>), E, D, T>) -> Result<Self::Output, D::Err> {
        self.attention(x, None)
    }
}

impl<
        const M: usize,
        const H: usize,
        const K: usize,
        const V: usize,
        S: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(S, Const<M>), E, D, T>> for SelfAttentionModule<M, H, K, V, E, D>
{
    type Output = Tensor<(S, Const<M>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(S, Const<M>), E, D, T>) -> Result<Self::Output, D::Err> {
        let s = x.shape().0;
        let x = x.try_reshape_like(&(Const::<1>, s, Const::<M>))?;
        self.attention(x, None)?.try_reshape_like(&(s, Const::<M>))
    }
}

fn check_mask<B: Dim, S: Dim, D: Storage<bool>>(
    layer: &str,
    mask: &Tensor<(B, S), bool, D>,
    want: (usize, usize),
    input: &str,
) -> Result<(), Error> {
    let got = mask.shape().concrete();
    if (got[0], got[1]) == want {
        return Ok(());
    }
    Err(Error::Shape(format!(
        "{layer}: the padding mask has shape [{}, {}], but the {input} needs one of shape \
         [{}, {}] (batch, key positions), true for a key to attend to",
        got[0], got[1], want.0, want.1
    )))
}

impl<
        const M: usize,
        const H: usize,
        const K: usize,
        const V: usize,
        B: Dim,
        S: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<(Tensor<(B, S, Const<M>), E, D, T>, Tensor<(B, S), bool, D>)>
    for SelfAttentionModule<M, H, K, V, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, S, Const<M>), E, D, T>;
    type Error = Error;
    fn try_forward(
        &self,
        (x, mask): (Tensor<(B, S, Const<M>), E, D, T>, Tensor<(B, S), bool, D>),
    ) -> Result<Self::Output, Error> {
        let (b, s, _) = *x.shape();
        let input = format!("input [B, S, M] = [{}, {}, {M}]", b.size(), s.size());
        check_mask("SelfAttention", &mask, (b.size(), s.size()), &input)?;
        Ok(self.attention(x, Some(mask))?)
    }
}

// ---------------------------------------------------------------------------------------------
// CrossAttention.
// ---------------------------------------------------------------------------------------------

/// Multi-head cross-attention: queries from one sequence, keys and values from another (the
/// encoder–decoder attention of Vaswani et al., <https://arxiv.org/abs/1706.03762>).
///
/// `Q = q W_qᵀ + b_q`, `K = kv W_kᵀ + b_k`, `V = kv W_vᵀ + b_v`, `H` heads, per head
/// `softmax(Q Kᵀ / √(M/H)) V`, then `w_o`. Both inputs carry the same tape type and the gradient
/// reaches both. An optional padding mask over the keys, `Tensor<(B, T), bool, D>` (`true` =
/// attend), works as in [`SelfAttention`]. Inputs whose batch sizes differ, or a mask of the
/// wrong size, are an [`Error::Shape`].
///
/// Parameters `w_q`, `w_k`, `w_v`, `w_o`, each a `Linear<M, M>` (`weight` `[M, M]`, `bias`
/// `[M]`). `H` must divide `M`.
///
/// # Shapes
/// `(q: [B, S, M], kv: [B, T, M])` or `(q, kv, mask: bool [B, T])` → `[B, S, M]`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let attn = dev.build_module::<CrossAttention<8, 2>, f32>();
/// let q: Tensor<Rank3<2, 3, 8>, f32, _> = dev.sample_normal();
/// let kv: Tensor<Rank3<2, 5, 8>, f32, _> = dev.sample_normal();
/// let y = attn.try_forward((q, kv))?;
/// assert_eq!(y.shape(), &(Const::<2>, Const::<3>, Const::<8>));
/// # Ok::<(), ModelError>(())
/// ```
///
/// PyTorch: `torch.nn.MultiheadAttention(M, H, batch_first=True)` called as `attn(q, kv, kv,
/// key_padding_mask=~mask)`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CrossAttention<const M: usize, const H: usize>;

impl<const M: usize, const H: usize> CrossAttention<M, H> {
    const TYPE_CHECK: () = assert!(
        H > 0 && M.is_multiple_of(H),
        "CrossAttention<M, H>: the number of heads H must divide the width M"
    );
}

/// The built [`CrossAttention`].
#[derive(Debug, Clone)]
pub struct CrossAttentionModule<const M: usize, const H: usize, E: Dtype, D: Storage<E>> {
    /// Query projection (of `q`), `[M, M]` and `[M]`.
    pub w_q: LinearModule<M, M, E, D>,
    /// Key projection (of `kv`), `[M, M]` and `[M]`.
    pub w_k: LinearModule<M, M, E, D>,
    /// Value projection (of `kv`), `[M, M]` and `[M]`.
    pub w_v: LinearModule<M, M, E, D>,
    /// Output projection, `[M, M]` and `[M]`.
    pub w_o: LinearModule<M, M, E, D>,
}

impl<const M: usize, const H: usize> LayerInfo for CrossAttention<M, H> {
    const PARAMS: usize = 4 * (M * M + M);
    const CHECKS: () = Self::TYPE_CHECK;
}

impl<const M: usize, const H: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E>
    for CrossAttention<M, H>
{
    type Built = CrossAttentionModule<M, H, E, D>;
    fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
        let () = CrossAttention::<M, H>::TYPE_CHECK;
        dfdx::nn::BuildModule::try_build(device)
    }
}

impl<const M: usize, const H: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for CrossAttentionModule<M, H, E, D>
{
}

impl<const M: usize, const H: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for CrossAttentionModule<M, H, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = CrossAttentionModule<M, H, E2, D2>;

    fn iter_tensors<Vi: ModuleVisitor<Self, E, D>>(
        visitor: &mut Vi,
    ) -> Result<Option<Self::To<Vi::E2, Vi::D2>>, Vi::Err> {
        visitor.visit_fields(
            (
                Self::module("w_q", |s| &s.w_q, |s| &mut s.w_q),
                Self::module("w_k", |s| &s.w_k, |s| &mut s.w_k),
                Self::module("w_v", |s| &s.w_v, |s| &mut s.w_v),
                Self::module("w_o", |s| &s.w_o, |s| &mut s.w_o),
            ),
            |(w_q, w_k, w_v, w_o)| CrossAttentionModule { w_q, w_k, w_v, w_o },
        )
    }
}

impl<const M: usize, const H: usize, E: Elem, D: Device<E>> CrossAttentionModule<M, H, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    fn attention<B: Dim, S: Dim, T: Dim, Tp: Tape<E, D>>(
        &self,
        q: Tensor<(B, S, Const<M>), E, D, Tp>,
        kv: Tensor<(B, T, Const<M>), E, D, Tp>,
        mask: Option<Tensor<(B, T), bool, D>>,
    ) -> Result<Tensor<(B, S, Const<M>), E, D, Tp>, Error> {
        let () = CrossAttention::<M, H>::TYPE_CHECK;
        let (b, s, _) = *q.shape();
        let (kb, t, _) = *kv.shape();
        if kb.size() != b.size() {
            return Err(Error::Shape(format!(
                "CrossAttention: the queries have batch size {} but the keys/values {}; \
                 pass one key/value sequence per query sequence",
                b.size(),
                kb.size()
            )));
        }
        if let Some(m) = &mask {
            let input = format!("keys/values [B, T, M] = [{}, {}, {M}]", kb.size(), t.size());
            check_mask("CrossAttention", m, (b.size(), t.size()), &input)?;
        }
        let qp = self.w_q.try_forward(q)?;
        let k = self.w_k.try_forward(kv.retaped::<Tp>())?;
        let v = self.w_v.try_forward(kv)?;
        let keep = match mask {
            Some(m) => Some(m.try_broadcast_like::<_, Axes2<1, 2>>(&(b, H, s, t))?),
            None => None,
        };
        Ok(self
            .w_o
            .try_forward(attend_heads(qp, k, v, H, keep, true)?)?)
    }
}

impl<
        const M: usize,
        const H: usize,
        B: Dim,
        S: Dim,
        T: Dim,
        E: Elem,
        D: Device<E>,
        Tp: Tape<E, D>,
    >
    Module<(
        Tensor<(B, S, Const<M>), E, D, Tp>,
        Tensor<(B, T, Const<M>), E, D, Tp>,
    )> for CrossAttentionModule<M, H, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, S, Const<M>), E, D, Tp>;
    type Error = Error;
    fn try_forward(
        &self,
        (q, kv): (
            Tensor<(B, S, Const<M>), E, D, Tp>,
            Tensor<(B, T, Const<M>), E, D, Tp>,
        ),
    ) -> Result<Self::Output, Error> {
        self.attention(q, kv, None)
    }
}

impl<
        const M: usize,
        const H: usize,
        B: Dim,
        S: Dim,
        T: Dim,
        E: Elem,
        D: Device<E>,
        Tp: Tape<E, D>,
    >
    Module<(
        Tensor<(B, S, Const<M>), E, D, Tp>,
        Tensor<(B, T, Const<M>), E, D, Tp>,
        Tensor<(B, T), bool, D>,
    )> for CrossAttentionModule<M, H, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, S, Const<M>), E, D, Tp>;
    type Error = Error;
    fn try_forward(
        &self,
        (q, kv, mask): (
            Tensor<(B, S, Const<M>), E, D, Tp>,
            Tensor<(B, T, Const<M>), E, D, Tp>,
            Tensor<(B, T), bool, D>,
        ),
    ) -> Result<Self::Output, Error> {
        self.attention(q, kv, Some(mask))
    }
}

#[cfg(test)]
pub(crate) mod reference {
    //! The PyTorch reference values of `tests/reference/attention.json`
    //! (`tools/reference/attention.py`).

    use dfdx::shapes::Shape;
    use dfdx::tensor::{Cpu, Tensor, TensorFromVec};
    use serde_json::Value;
    use std::sync::OnceLock;

    fn all() -> &'static Value {
        static CASES: OnceLock<Value> = OnceLock::new();
        CASES.get_or_init(|| {
            serde_json::from_str(include_str!("../../tests/reference/attention.json"))
                .expect("attention.json parses")
        })
    }

    /// One case of the file.
    pub struct Case(&'static Value);

    /// The case `name`.
    pub fn case(name: &str) -> Case {
        let cases = all()["cases"].as_array().expect("cases");
        Case(
            cases
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no case {name} in attention.json")),
        )
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    impl Case {
        /// A config value.
        pub fn config(&self, key: &str) -> usize {
            self.0["config"][key].as_u64().expect("config") as usize
        }
        /// An input's values.
        pub fn input(&self, key: &str) -> Vec<f64> {
            floats(&self.0["inputs"][key]["data"])
        }
        /// A parameter's values.
        pub fn param(&self, key: &str) -> Vec<f64> {
            floats(&self.0["params"][key]["data"])
        }
        /// A parameter's shape.
        pub fn param_shape(&self, key: &str) -> Vec<usize> {
            self.0["params"][key]["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|x| x.as_u64().expect("dim") as usize)
                .collect()
        }
        /// A boolean mask.
        pub fn mask(&self, key: &str) -> Vec<bool> {
            self.0["masks"][key]
                .as_array()
                .expect("mask")
                .iter()
                .map(|x| x.as_bool().expect("bool"))
                .collect()
        }
        /// PyTorch's output.
        pub fn y(&self) -> Vec<f64> {
            floats(&self.0["y"]["data"])
        }
        /// The upstream gradient of the loss `sum(y * g)`.
        pub fn g(&self) -> Vec<f64> {
            floats(&self.0["g"])
        }
        /// PyTorch's gradient of `sum(y * g)` with respect to an input or a parameter.
        pub fn grad(&self, key: &str) -> Vec<f64> {
            floats(&self.0["grads"][key])
        }
        /// An input as a tensor.
        pub fn tensor<S: Shape>(&self, dev: &Cpu, key: &str, shape: S) -> Tensor<S, f64, Cpu> {
            dev.tensor_from_vec(self.input(key), shape)
        }
        /// A parameter as a tensor, its shape checked against the file's.
        pub fn param_tensor<S: Shape>(
            &self,
            dev: &Cpu,
            key: &str,
            shape: S,
        ) -> Tensor<S, f64, Cpu> {
            let want: Vec<usize> = shape.concrete().into_iter().collect();
            assert_eq!(self.param_shape(key), want, "{key}");
            dev.tensor_from_vec(self.param(key), shape)
        }
    }

    /// `max |a - b|`, asserting it is within `tol`.
    pub fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) -> f64 {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= tol,
            "{what}: max |ours - pytorch| = {worst:e} > {tol:e}; first {:?} vs {:?}",
            &a[..4.min(a.len())],
            &b[..4.min(b.len())]
        );
        worst
    }
}

#[cfg(test)]
mod tests {
    use super::reference::{assert_close, case, Case};
    use crate::gradcheck::{check_input_grads, check_param_grads, named_grads, named_values};
    use crate::layers::cpu_fast::both_paths;
    use crate::prelude::*;

    type Dev = Cpu;

    fn linear<const I: usize, const O: usize>(
        c: &Case,
        dev: &Dev,
        name: &str,
    ) -> crate::layers::LinearModule<I, O, f64, Dev> {
        crate::layers::LinearModule {
            weight: c.param_tensor(dev, &format!("{name}.weight"), (Const::<O>, Const::<I>)),
            bias: c.param_tensor(dev, &format!("{name}.bias"), (Const::<O>,)),
        }
    }

    fn self_attention<const K: usize, const V: usize>(
        c: &Case,
        dev: &Dev,
    ) -> SelfAttentionModule<8, 2, K, V, f64, Dev> {
        SelfAttentionModule {
            w_q: linear(c, dev, "w_q"),
            w_k: linear(c, dev, "w_k"),
            w_v: linear(c, dev, "w_v"),
            w_o: linear(c, dev, "w_o"),
        }
    }

    fn cross_attention(c: &Case, dev: &Dev) -> CrossAttentionModule<8, 2, f64, Dev> {
        CrossAttentionModule {
            w_q: linear(c, dev, "w_q"),
            w_k: linear(c, dev, "w_k"),
            w_v: linear(c, dev, "w_v"),
            w_o: linear(c, dev, "w_o"),
        }
    }

    /// Our gradients of `sum(y * g)` against PyTorch's, for every parameter.
    fn assert_param_grads_match<M: TensorCollection<f64, Dev>>(
        c: &Case,
        m: &mut M,
        grads: &Gradients<f64, Dev>,
    ) {
        for (name, g) in named_grads(m, grads) {
            assert_close(&format!("grad {name}"), &g, &c.grad(&name), 1e-12);
        }
    }

    #[test]
    fn self_attention_matches_pytorch() {
        both_paths(|_| self_attention_matches_pytorch_on_this_path());
    }

    fn self_attention_matches_pytorch_on_this_path() {
        let dev = Dev::default();
        let c = case("self_attention");
        let mut m = self_attention::<8, 8>(&c, &dev);
        let x = c.tensor(&dev, "x", (Const::<2>, Const::<3>, Const::<8>));
        let g = dev.tensor_from_vec(c.g(), (Const::<2>, Const::<3>, Const::<8>));
        assert_close("y", &m.forward(x.clone()).as_vec(), &c.y(), 1e-12);

        let grads = (m.forward(x.leaky_trace()) * g.clone())
            .sum::<Rank0, _>()
            .backward();
        assert_close("grad x", &grads.get(&x).as_vec(), &c.grad("x"), 1e-12);
        assert_param_grads_match(&c, &mut m, &grads);

        // Unbatched input: the same as a batch of one.
        let x0: Tensor<Rank2<3, 8>, f64, Dev> =
            dev.tensor_from_vec(c.input("x")[..24].to_vec(), (Const, Const));
        assert_close("unbatched", &m.forward(x0).as_vec(), &c.y()[..24], 1e-12);
    }

    #[test]
    fn self_attention_with_other_key_and_value_widths_matches_pytorch() {
        both_paths(|_| {
            self_attention_with_other_key_and_value_widths_matches_pytorch_on_this_path()
        });
    }

    fn self_attention_with_other_key_and_value_widths_matches_pytorch_on_this_path() {
        let dev = Dev::default();
        let c = case("self_attention_kv_widths");
        let m = self_attention::<6, 4>(&c, &dev);
        let x = c.tensor(&dev, "x", (Const::<2>, Const::<3>, Const::<8>));
        assert_close("y", &m.forward(x).as_vec(), &c.y(), 1e-12);
        assert_eq!(
            <SelfAttention<8, 2, 6, 4> as LayerInfo>::PARAMS,
            dev.build_module::<SelfAttention<8, 2, 6, 4>, f64>()
                .num_trainable_params()
        );
    }

    #[test]
    fn padding_mask_matches_pytorch_and_an_all_padding_row_gives_the_bias() {
        both_paths(|_| {
            padding_mask_matches_pytorch_and_an_all_padding_row_gives_the_bias_on_this_path()
        });
    }

    fn padding_mask_matches_pytorch_and_an_all_padding_row_gives_the_bias_on_this_path() {
        let dev = Dev::default();
        let c = case("self_attention_padding");
        let mut m = self_attention::<8, 8>(&c, &dev);
        let x = c.tensor(&dev, "x", (Const::<2>, Const::<3>, Const::<8>));
        let mask = dev.tensor_from_vec(c.mask("mask"), (Const::<2>, Const::<3>));
        let g = dev.tensor_from_vec(c.g(), (Const::<2>, Const::<3>, Const::<8>));
        let y = m.forward((x.clone(), mask.clone())).as_vec();
        assert_close("y", &y, &c.y(), 1e-12);
        // Sequence 1 is all padding: attention contributes 0, w_o's bias is what is left.
        let bias = m.w_o.bias.as_vec();
        for s in 0..3 {
            assert_eq!(&y[24 + 8 * s..32 + 8 * s], &bias[..], "position {s}");
        }

        let grads = (m.forward((x.leaky_trace(), mask.clone())) * g)
            .sum::<Rank0, _>()
            .backward();
        let gx = grads.get(&x).as_vec();
        assert!(gx.iter().all(|v| v.is_finite()), "{gx:?}");
        assert_close("grad x", &gx, &c.grad("x"), 1e-12);
        assert_param_grads_match(&c, &mut m, &grads);
    }

    #[test]
    fn padding_keys_do_not_reach_other_positions() {
        both_paths(|_| padding_keys_do_not_reach_other_positions_on_this_path());
    }

    fn padding_keys_do_not_reach_other_positions_on_this_path() {
        let dev = Dev::seed_from_u64(4);
        let m = dev.build_module::<SelfAttention<8, 2>, f64>();
        let x: Tensor<Rank3<2, 4, 8>, f64, Dev> = dev.sample_normal();
        let mask = dev.tensor([[true, true, false, true], [true, true, true, true]]);
        let y = m.forward((x.clone(), mask.clone())).array();
        // Change the padding token of sequence 0: positions 0, 1 and 3 must not move.
        let mut xs = x.array();
        xs[0][2] = [5.0; 8];
        let y2 = m.forward((dev.tensor(xs), mask)).array();
        for s in [0, 1, 3] {
            assert_eq!(y[0][s], y2[0][s], "position {s}");
        }
        assert_ne!(
            y[0][2], y2[0][2],
            "the padding position's own output is computed"
        );
        assert_eq!(y[1], y2[1]);
    }

    #[test]
    fn a_wrong_mask_is_a_shape_error() {
        let dev = Dev::default();
        let m = dev.build_module::<SelfAttention<8, 2>, f64>();
        let x: Tensor<(usize, usize, Const<8>), f64, Dev> = dev.zeros_like(&(2, 3, Const));
        let mask: Tensor<(usize, usize), bool, Dev> = dev.tensor_from_vec(vec![true; 8], (2, 4));
        let err = m.try_forward((x, mask)).map(|_| ()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("SelfAttention") && msg.contains("[2, 4]"),
            "{msg}"
        );
        assert!(msg.contains("[2, 3]"), "{msg}");
    }

    #[test]
    fn self_attention_gradients_match_central_differences() {
        both_paths(|_| self_attention_gradients_match_central_differences_on_this_path());
    }

    fn self_attention_gradients_match_central_differences_on_this_path() {
        let dev = Dev::seed_from_u64(1);
        let mut m = dev.build_module::<SelfAttention<8, 2>, f64>();
        let x: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let g: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let mask = dev.tensor([[true, false, true], [false, false, false]]);
        for masked in [false, true] {
            let loss = |m: &SelfAttentionModule<8, 2, 8, 8, f64, Dev>, x| {
                let y = if masked {
                    m.forward((x, mask.clone()))
                } else {
                    m.forward(x)
                };
                (y * g.clone()).sum::<Rank0, _>()
            };
            let report = check_param_grads(&mut m, |m, grads| loss(m, x.trace(grads)));
            assert_eq!(report.checked, <SelfAttention<8, 2> as LayerInfo>::PARAMS);
            assert!(
                report.max_abs_err <= 1e-6,
                "params (masked: {masked}): {report}"
            );
            eprintln!("self-attention params (masked: {masked}): {report}");
            let report = check_input_grads(&x, |x| loss(&m, x));
            assert!(
                report.max_abs_err <= 1e-6,
                "input (masked: {masked}): {report}"
            );
            eprintln!("self-attention input (masked: {masked}): {report}");
        }
        assert_eq!(
            m.num_trainable_params(),
            <SelfAttention<8, 2> as LayerInfo>::PARAMS
        );
        let names: Vec<String> = named_values(&mut m).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "w_q.weight",
                "w_q.bias",
                "w_k.weight",
                "w_k.bias",
                "w_v.weight",
                "w_v.bias",
                "w_o.weight",
                "w_o.bias"
            ]
        );
    }

    type Q<T> = Tensor<Rank3<2, 3, 8>, f64, Dev, T>;
    type Kv<T> = Tensor<Rank3<2, 4, 8>, f64, Dev, T>;

    fn run_cross<T: Tape<f64, Dev>>(
        m: &CrossAttentionModule<8, 2, f64, Dev>,
        q: Q<T>,
        kv: Kv<T>,
        mask: &Option<Tensor<Rank2<2, 4>, bool, Dev>>,
    ) -> Q<T> {
        match mask {
            Some(mask) => m.forward((q, kv, mask.clone())),
            None => m.forward((q, kv)),
        }
    }

    #[test]
    fn cross_attention_matches_pytorch() {
        both_paths(|_| cross_attention_matches_pytorch_on_this_path());
    }

    fn cross_attention_matches_pytorch_on_this_path() {
        let dev = Dev::default();
        for (name, masked) in [
            ("cross_attention", false),
            ("cross_attention_padding", true),
        ] {
            let c = case(name);
            let mut m = cross_attention(&c, &dev);
            let q = c.tensor(&dev, "q", (Const::<2>, Const::<3>, Const::<8>));
            let kv = c.tensor(&dev, "kv", (Const::<2>, Const::<4>, Const::<8>));
            let g = dev.tensor_from_vec(c.g(), (Const::<2>, Const::<3>, Const::<8>));
            let mask =
                masked.then(|| dev.tensor_from_vec(c.mask("mask"), (Const::<2>, Const::<4>)));
            let y = run_cross(&m, q.clone(), kv.clone(), &mask);
            assert_close(&format!("{name} y"), &y.as_vec(), &c.y(), 1e-12);
            let y = run_cross(&m, q.leaky_trace(), kv.leaky_trace(), &mask);
            let grads = (y * g).sum::<Rank0, _>().backward();
            assert_close(
                &format!("{name} grad q"),
                &grads.get(&q).as_vec(),
                &c.grad("q"),
                1e-12,
            );
            assert_close(
                &format!("{name} grad kv"),
                &grads.get(&kv).as_vec(),
                &c.grad("kv"),
                1e-12,
            );
            assert_param_grads_match(&c, &mut m, &grads);
        }
    }

    #[test]
    fn cross_attention_gradients_match_central_differences() {
        both_paths(|_| cross_attention_gradients_match_central_differences_on_this_path());
    }

    fn cross_attention_gradients_match_central_differences_on_this_path() {
        let dev = Dev::seed_from_u64(2);
        let mut m = dev.build_module::<CrossAttention<8, 2>, f64>();
        let q: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let kv: Tensor<Rank3<2, 4, 8>, f64, Dev> = dev.sample_normal();
        let g: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let mask = dev.tensor([[true, true, false, true], [false, true, false, false]]);
        let report = check_param_grads(&mut m, |m, grads| {
            (m.forward((q.trace(grads), kv.retaped(), mask.clone())) * g.clone()).sum()
        });
        assert_eq!(report.checked, <CrossAttention<8, 2> as LayerInfo>::PARAMS);
        assert!(report.max_abs_err <= 1e-6, "params: {report}");
        eprintln!("cross-attention params: {report}");
        let report = check_input_grads(&q, |q| {
            (m.forward((q, kv.retaped(), mask.clone())) * g.clone()).sum()
        });
        assert!(report.max_abs_err <= 1e-6, "q: {report}");
        eprintln!("cross-attention q: {report}");
        let report = check_input_grads(&kv, |kv| {
            (m.forward((q.retaped(), kv, mask.clone())) * g.clone()).sum()
        });
        assert!(report.max_abs_err <= 1e-6, "kv: {report}");
        eprintln!("cross-attention kv: {report}");
        assert_eq!(
            m.num_trainable_params(),
            <CrossAttention<8, 2> as LayerInfo>::PARAMS
        );
    }

    #[test]
    fn cross_attention_rejects_different_batch_sizes() {
        let dev = Dev::default();
        let m = dev.build_module::<CrossAttention<8, 2>, f64>();
        let q: Tensor<(usize, usize, Const<8>), f64, Dev> = dev.zeros_like(&(2, 3, Const));
        let kv: Tensor<(usize, usize, Const<8>), f64, Dev> = dev.zeros_like(&(3, 4, Const));
        let msg = m.try_forward((q, kv)).map(|_| ()).unwrap_err().to_string();
        assert!(msg.contains("batch size 2") && msg.contains('3'), "{msg}");
    }

    #[test]
    fn projections_keep_pytorch_shapes() {
        let dev = Dev::seed_from_u64(0);
        let mut p = InProj::<8, 3, 8, f64, Dev>::build(&dev);
        assert_eq!(p.weight.shape().concrete(), [24, 8]);
        assert_eq!(p.num_trainable_params(), 24 * 8 + 24);
        let names: Vec<String> = named_values(&mut p).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight", "bias"]);
        let o = OutProjNoBias::<4, 2, 8, f64, Dev>::build(&dev);
        assert_eq!(o.weight.shape().concrete(), [8, 8]);
        let x: Tensor<_, f64, Dev> = dev.zeros_like(&(Const::<1>, 2, ConstProd::<4, 2>));
        assert_eq!(o.forward(x).shape().concrete(), [1, 2, 8]);

        // Saved with PyTorch's shapes, and loaded back with them checked.
        let path =
            std::env::temp_dir().join(format!("na-inproj-{}.safetensors", std::process::id()));
        p.save_safetensors(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("weight").unwrap().shape(), [24, 8]);
        assert_eq!(st.tensor("bias").unwrap().shape(), [24]);
        let mut q = InProj::<8, 3, 8, f64, Dev>::build(&dev);
        q.load_safetensors(&path).unwrap();
        assert_eq!(q.weight.as_vec(), p.weight.as_vec());
        let mut wrong = InProj::<8, 2, 8, f64, Dev>::build(&dev);
        assert!(wrong.load_safetensors(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
