//! The parameter-free core of multi-head attention, for models that name their projections
//! themselves (BERT's `query`/`key`/`value`, CLIP's `q_proj`/.../`out_proj`).

#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use super::attention::attend_heads;
use super::LayerInfo;
use crate::{Elem, Error};
use dfdx::nn::{BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection};
use dfdx::shapes::{Axes2, Const, Dim, Dtype, HasShape, Shape};
use dfdx::tensor::{HasErr, Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, ChooseFrom, Device, TryNe};
use std::marker::PhantomData;

/// Scaled dot-product attention over `H` heads, without parameters:
/// `softmax(Q Kᵀ / √(K/H) + mask) V` per head, on queries, keys and values that the model
/// projected itself (Vaswani et al., <https://arxiv.org/abs/1706.03762>).
///
/// The width `K` of queries and keys is split into `H` heads of `K/H`, as is the value width
/// `V`; the heads are merged back into `V` columns. With `CAUSAL = true`, query `i` sees keys
/// `0..=i` (GPT-style decoders, CLIP's text tower). An optional padding mask `bool [B, T]`
/// (`true` = attend, Hugging Face's `attention_mask`) hides keys; a query whose keys are all
/// hidden gives zeros instead of NaN.
///
/// # Shapes
/// `(q: [B, S, K], k: [B, T, K], v: [B, T, V])` or `(q, k, v, mask: bool [B, T])` →
/// `[B, S, V]`. Mismatched batch or key lengths, or a mask of the wrong size, are an
/// [`Error::Shape`]; `H` must divide `K` and `V` (checked when the model is built).
///
/// PyTorch: `torch.nn.functional.scaled_dot_product_attention` on `(B, H, S, K/H)` heads.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let attn = dev.build_module::<ScaledDotProductAttention<2>, f32>();
/// let q: Tensor<Rank3<1, 3, 4>, f32, _> = dev.sample_normal();
/// let kv: Tensor<Rank3<1, 5, 4>, f32, _> = dev.sample_normal();
/// let y = attn.try_forward((q, kv.clone(), kv))?;
/// assert_eq!(y.shape(), &(Const::<1>, Const::<3>, Const::<4>));
/// # Ok::<(), ModelError>(())
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScaledDotProductAttention<const H: usize, const CAUSAL: bool = false>;

/// The built [`ScaledDotProductAttention`]: no parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct SdpaModule<const H: usize, const CAUSAL: bool, E, D>(PhantomData<(E, D)>);

impl<const H: usize, const CAUSAL: bool> LayerInfo for ScaledDotProductAttention<H, CAUSAL> {
    const PARAMS: usize = 0;
}

impl<const H: usize, const CAUSAL: bool, E: Elem, D: Device<E>> BuildOnDevice<D, E>
    for ScaledDotProductAttention<H, CAUSAL>
{
    type Built = SdpaModule<H, CAUSAL, E, D>;
}

impl<const H: usize, const CAUSAL: bool, E: Dtype, D: Storage<E>> NonMutableModule
    for SdpaModule<H, CAUSAL, E, D>
{
}

impl<const H: usize, const CAUSAL: bool, E: Elem, D: Device<E>> TensorCollection<E, D>
    for SdpaModule<H, CAUSAL, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = SdpaModule<H, CAUSAL, E2, D2>;

    fn iter_tensors<W: ModuleVisitor<Self, E, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields((), |()| SdpaModule(PhantomData))
    }
}

impl<const H: usize, const CAUSAL: bool, E: Elem, D: Device<E>> SdpaModule<H, CAUSAL, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    fn run<B: Dim, S: Dim, T: Dim, const K: usize, const V: usize, Tp: Tape<E, D>>(
        q: Tensor<(B, S, Const<K>), E, D, Tp>,
        k: Tensor<(B, T, Const<K>), E, D, Tp>,
        v: Tensor<(B, T, Const<V>), E, D, Tp>,
        mask: Option<Tensor<(B, T), bool, D>>,
    ) -> Result<Tensor<(B, S, Const<V>), E, D, Tp>, Error> {
        if H == 0 || !K.is_multiple_of(H) || !V.is_multiple_of(H) {
            return Err(Error::Shape(format!(
                "ScaledDotProductAttention<{H}>: the heads must divide the query width {K} and \
                 the value width {V}"
            )));
        }
        let (b, s, _) = *q.shape();
        let (kb, t, _) = *k.shape();
        let (vb, vt, _) = *v.shape();
        if kb.size() != b.size() || vb.size() != b.size() || vt.size() != t.size() {
            return Err(Error::Shape(format!(
                "ScaledDotProductAttention: q is [{}, {}, {K}], k [{}, {}, {K}] and v [{}, {}, \
                 {V}]; the batch sizes must agree, and k and v must have the same length",
                b.size(),
                s.size(),
                kb.size(),
                t.size(),
                vb.size(),
                vt.size()
            )));
        }
        if CAUSAL && t.size() < s.size() {
            return Err(Error::Shape(format!(
                "ScaledDotProductAttention (causal): {} queries but only {} keys",
                s.size(),
                t.size()
            )));
        }
        let shape = (b, H, s, t);
        let keep = match mask {
            Some(m) => {
                let got = m.shape().concrete();
                if got != [b.size(), t.size()] {
                    return Err(Error::Shape(format!(
                        "ScaledDotProductAttention: the padding mask has shape [{}, {}], but the \
                         keys need [{}, {}] (batch, key positions), true for a key to attend to",
                        got[0],
                        got[1],
                        b.size(),
                        t.size()
                    )));
                }
                Some(m.try_broadcast_like::<_, Axes2<1, 2>>(&shape)?)
            }
            None => None,
        };
        let keep = if CAUSAL {
            // Query i sees keys 0..=i (shifted when there are more keys than queries), and
            // where a padding mask is given, only the keys it keeps.
            let dev = q.device().clone();
            let past = (t.size() - s.size()) as isize;
            let tri: Tensor<(S, T), E, D> = dev.try_lower_tri_like(&(s, t), E::ONE, past)?;
            let tri = tri.try_broadcast_like::<_, Axes2<0, 1>>(&shape)?;
            let tri = match keep {
                Some(pad) => pad.try_choose(tri, dev.try_zeros_like(&shape)?)?,
                None => tri,
            };
            Some(tri.try_ne(E::default())?)
        } else {
            keep
        };
        Ok(attend_heads(q, k, v, H, keep, true)?)
    }
}

impl<
        const H: usize,
        const CAUSAL: bool,
        const K: usize,
        const V: usize,
        B: Dim,
        S: Dim,
        T: Dim,
        E: Elem,
        D: Device<E>,
        Tp: Tape<E, D>,
    >
    Module<(
        Tensor<(B, S, Const<K>), E, D, Tp>,
        Tensor<(B, T, Const<K>), E, D, Tp>,
        Tensor<(B, T, Const<V>), E, D, Tp>,
    )> for SdpaModule<H, CAUSAL, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, S, Const<V>), E, D, Tp>;
    type Error = Error;
    fn try_forward(
        &self,
        (q, k, v): (
            Tensor<(B, S, Const<K>), E, D, Tp>,
            Tensor<(B, T, Const<K>), E, D, Tp>,
            Tensor<(B, T, Const<V>), E, D, Tp>,
        ),
    ) -> Result<Self::Output, Error> {
        Self::run(q, k, v, None)
    }
}

impl<
        const H: usize,
        const CAUSAL: bool,
        const K: usize,
        const V: usize,
        B: Dim,
        S: Dim,
        T: Dim,
        E: Elem,
        D: Device<E>,
        Tp: Tape<E, D>,
    >
    Module<(
        Tensor<(B, S, Const<K>), E, D, Tp>,
        Tensor<(B, T, Const<K>), E, D, Tp>,
        Tensor<(B, T, Const<V>), E, D, Tp>,
        Tensor<(B, T), bool, D>,
    )> for SdpaModule<H, CAUSAL, E, D>
where
    Error: From<<D as HasErr>::Err>,
{
    type Output = Tensor<(B, S, Const<V>), E, D, Tp>;
    type Error = Error;
    fn try_forward(
        &self,
        (q, k, v, mask): (
            Tensor<(B, S, Const<K>), E, D, Tp>,
            Tensor<(B, T, Const<K>), E, D, Tp>,
            Tensor<(B, T, Const<V>), E, D, Tp>,
            Tensor<(B, T), bool, D>,
        ),
    ) -> Result<Self::Output, Error> {
        Self::run(q, k, v, Some(mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cpu_fast::both_paths;
    use crate::prelude::*;

    /// The core agrees with `SelfAttention`, whose projections are its own, given the same ones.
    #[test]
    fn matches_self_attention_with_the_same_projections() -> Result<(), Error> {
        both_paths(|path| {
            matches_self_attention_with_the_same_projections_on_this_path()
                .unwrap_or_else(|e| panic!("{path}: {e}"))
        });
        Ok(())
    }

    fn matches_self_attention_with_the_same_projections_on_this_path() -> Result<(), Error> {
        let dev = Cpu::default();
        let mha = dev.build_module::<SelfAttention<8, 2>, f64>();
        let core = dev.build_module::<ScaledDotProductAttention<2>, f64>();
        let x: Tensor<Rank3<2, 5, 8>, f64, _> = dev.sample_normal();
        let mask = dev.tensor([[true, true, true, false, false], [true; 5]]);
        let want0 = mha.try_forward(x.clone())?;
        {
            let q = mha.w_q.try_forward(x.clone())?;
            let k = mha.w_k.try_forward(x.clone())?;
            let v = mha.w_v.try_forward(x.clone())?;
            let got0 = mha.w_o.try_forward(core.try_forward((q, k, v))?)?;
            let diff = want0
                .as_vec()
                .iter()
                .zip(&got0.as_vec())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "unmasked: max difference {diff}");
        }
        let want = mha.try_forward((x.clone(), mask.clone()))?;
        let q = mha.w_q.try_forward(x.clone())?;
        let k = mha.w_k.try_forward(x.clone())?;
        let v = mha.w_v.try_forward(x)?;
        let got = mha.w_o.try_forward(core.try_forward((q, k, v, mask))?)?;
        let (w, g) = (want.as_vec(), got.as_vec());
        let diff = w
            .iter()
            .zip(&g)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-12, "max difference {diff}");
        Ok(())
    }

    /// Causal with and without an all-true padding mask gives the same values, and a later
    /// key never changes an earlier query's output.
    #[test]
    fn causal_paths_agree_and_look_only_back() -> Result<(), Error> {
        both_paths(|path| {
            causal_paths_agree_and_look_only_back_on_this_path()
                .unwrap_or_else(|e| panic!("{path}: {e}"))
        });
        Ok(())
    }

    fn causal_paths_agree_and_look_only_back_on_this_path() -> Result<(), Error> {
        let dev = Cpu::default();
        let core = dev.build_module::<ScaledDotProductAttention<2, true>, f64>();
        let q: Tensor<Rank3<1, 4, 4>, f64, _> = dev.sample_normal();
        let k: Tensor<Rank3<1, 4, 4>, f64, _> = dev.sample_normal();
        let v: Tensor<Rank3<1, 4, 6>, f64, _> = dev.sample_normal();
        let plain = core
            .try_forward((q.clone(), k.clone(), v.clone()))?
            .as_vec();
        let masked = core
            .try_forward((q.clone(), k.clone(), v.clone(), dev.tensor([[true; 4]])))?
            .as_vec();
        for (a, b) in plain.iter().zip(&masked) {
            assert!((a - b).abs() < 1e-12);
        }
        let mut k2 = k.as_vec();
        k2[12..].iter_mut().for_each(|x| *x += 1.0);
        let k2: Tensor<Rank3<1, 4, 4>, f64, _> = dev.tensor_from_vec(k2, (Const, Const, Const));
        let changed = core.try_forward((q, k2, v))?.as_vec();
        assert_eq!(
            &plain[..18],
            &changed[..18],
            "queries 0..3 must not see key 3"
        );
        assert_ne!(&plain[18..], &changed[18..]);
        Ok(())
    }

    #[test]
    fn a_wrong_mask_is_an_error() {
        let dev = Cpu::default();
        let core = dev.build_module::<ScaledDotProductAttention<2>, f32>();
        let x: Tensor<(usize, usize, Const<4>), f32, _> = dev.zeros_like(&(1, 3, Const));
        let bad: Tensor<(usize, usize), bool, _> = dev.tensor_from_vec(vec![true; 2], (1, 2));
        let Err(e) = core.try_forward((x.clone(), x.clone(), x, bad)) else {
            panic!("expected an error");
        };
        assert!(e.to_string().contains("padding mask"), "{e}");
    }
}
