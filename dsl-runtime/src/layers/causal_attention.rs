//! GPT-2's causal self-attention, with a key/value cache for generation.
#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use super::attention::{causal_attend, split_heads, InProj, KvCache};
use super::cpu_fast::fused_stored;
use super::fused_attention::attend_packed_causal_cpu;
use super::LayerInfo;
use super::LinearModule;
use crate::{Elem, Error};
use dfdx::nn::{BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection};
use dfdx::shapes::{Const, Dim, Dtype, HasShape};
use dfdx::tensor::{HasErr, NoneTape, Storage, Tape, Tensor};
use dfdx::tensor_ops::Device;

/// Multi-head self-attention in which position `i` attends only to positions `≤ i` (GPT-2,
/// Radford et al. 2019; nanoGPT's `CausalSelfAttention`): `[B, T, M] -> [B, T, M]`.
///
/// `[Q | K | V] = x W_attnᵀ + b_attn` (one fused projection), `H` heads, per head
/// `softmax(Q Kᵀ / √(M/H) + causal mask) V`, then `c_proj`. The mask sets the scores of later
/// positions to −∞ (in effect: see [`super::SelfAttention`]).
///
/// Parameters named as GPT-2's: `c_attn` (`weight` `[3M, M]`, `bias` `[3M]`: the query, key and
/// value projections stacked in that order) and `c_proj` (`Linear<M, M>`). `H` must divide `M`.
///
/// For generation, [`CausalSelfAttentionModule::try_forward_cached`] takes only the new tokens
/// and a [`KvCache`]; its outputs equal those of the full forward over the whole sequence.
///
/// # Shapes
/// `x: [B, T, M]` → `[B, T, M]`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// let attn = dev.build_module::<CausalSelfAttention<8, 2>, f32>();
/// let x: Tensor<Rank3<2, 5, 8>, f32, _> = dev.sample_normal();
/// let y = attn.forward(x);
/// assert_eq!(y.shape().1, Const::<5>);
/// assert_eq!(<CausalSelfAttention<8, 2> as LayerInfo>::PARAMS, 8 * 24 + 24 + 8 * 8 + 8);
/// ```
///
/// Heads that do not divide the width are a compile-time error when the layer is built:
///
/// ```compile_fail
/// # use neural_arch::prelude::*;
/// let attn = Cpu::default().build_module::<CausalSelfAttention<10, 4>, f32>();
/// ```
///
/// PyTorch (nanoGPT): `q, k, v = c_attn(x).split(M, dim=2)`, heads split,
/// `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, heads merged, `c_proj`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CausalSelfAttention<const M: usize, const H: usize>;

impl<const M: usize, const H: usize> CausalSelfAttention<M, H> {
    const TYPE_CHECK: () = assert!(
        H > 0 && M.is_multiple_of(H),
        "CausalSelfAttention<M, H>: the number of heads H must divide the width M"
    );
}

/// The built [`CausalSelfAttention`].
#[derive(Debug, Clone)]
pub struct CausalSelfAttentionModule<const M: usize, const H: usize, E: Dtype, D: Storage<E>> {
    /// The fused query, key and value projection: `weight` `[3M, M]`, `bias` `[3M]`.
    pub c_attn: InProj<M, 3, M, E, D>,
    /// The output projection, `[M, M]` and `[M]`.
    pub c_proj: LinearModule<M, M, E, D>,
}

impl<const M: usize, const H: usize> LayerInfo for CausalSelfAttention<M, H> {
    const PARAMS: usize = (M * 3 * M + 3 * M) + (M * M + M);
    const CHECKS: () = Self::TYPE_CHECK;
}

impl<const M: usize, const H: usize, E: Elem, D: Device<E>> BuildOnDevice<D, E>
    for CausalSelfAttention<M, H>
{
    type Built = CausalSelfAttentionModule<M, H, E, D>;
    fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
        let () = CausalSelfAttention::<M, H>::TYPE_CHECK;
        dfdx::nn::BuildModule::try_build(device)
    }
}

impl<const M: usize, const H: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for CausalSelfAttentionModule<M, H, E, D>
{
}

impl<const M: usize, const H: usize, E: Elem, D: Device<E>> TensorCollection<E, D>
    for CausalSelfAttentionModule<M, H, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = CausalSelfAttentionModule<M, H, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("c_attn", |s| &s.c_attn, |s| &mut s.c_attn),
                Self::module("c_proj", |s| &s.c_proj, |s| &mut s.c_proj),
            ),
            |(c_attn, c_proj)| CausalSelfAttentionModule { c_attn, c_proj },
        )
    }
}

/// New keys and values `(B, H, S, hd)`.
type Heads<B, S, E, D, T> = Tensor<(B, usize, S, usize), E, D, T>;

impl<const M: usize, const H: usize, E: Elem, D: Device<E>> CausalSelfAttentionModule<M, H, E, D> {
    /// The forward pass for new tokens at positions `past..`; `kv` turns the new keys and
    /// values into all the keys and values to attend over (itself, or the cache's).
    fn attention<B, S, T, Tp, Er, F>(
        &self,
        x: Tensor<(B, S, Const<M>), E, D, Tp>,
        past: usize,
        kv: F,
    ) -> Result<Tensor<(B, S, Const<M>), E, D, Tp>, Er>
    where
        B: Dim,
        S: Dim,
        T: Dim,
        Tp: Tape<E, D>,
        Er: From<<D as HasErr>::Err>,
        F: FnOnce(
            Heads<B, S, E, D, Tp>,
            Heads<B, S, E, D, Tp>,
        ) -> Result<(Heads<B, T, E, D, Tp>, Heads<B, T, E, D, Tp>), Er>,
    {
        let () = CausalSelfAttention::<M, H>::TYPE_CHECK;
        let qkv = self.c_attn.try_forward(x)?;
        // Slicing a tensor made here, into disjoint parts: dfdx's slice backward assigns
        // rather than adds, which is only right when nothing else writes that gradient.
        let q = split_heads(qkv.retaped::<Tp>().try_slice((.., .., 0..M))?, H)?;
        let k = split_heads(qkv.retaped::<Tp>().try_slice((.., .., M..2 * M))?, H)?;
        let v = split_heads(qkv.try_slice((.., .., 2 * M..3 * M))?, H)?;
        let (k, v) = kv(k, v)?;
        let y = causal_attend(q, k, v, past, Const::<M>)?;
        Ok(self.c_proj.try_forward(y)?)
    }

    /// The outputs for the new tokens `x` `[B, S, M]`, attending over the cached positions and
    /// themselves; their keys and values are appended to `cache`. Over a sequence fed in any
    /// number of pieces the outputs equal [`Module::forward`] on the whole sequence.
    ///
    /// A cache filled for another batch size or another layer shape is an [`Error::Shape`].
    pub fn try_forward_cached<B: Dim, S: Dim>(
        &self,
        x: Tensor<(B, S, Const<M>), E, D, NoneTape>,
        cache: &mut KvCache<E, D>,
    ) -> Result<Tensor<(B, S, Const<M>), E, D, NoneTape>, Error>
    where
        Error: From<<D as HasErr>::Err>,
    {
        let past = cache.len();
        self.attention(x, past, |k, v| {
            cache.extend("CausalSelfAttention::try_forward_cached", k, v)
        })
    }
}

impl<const M: usize, const H: usize, B: Dim, S: Dim, E: Elem, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, S, Const<M>), E, D, T>> for CausalSelfAttentionModule<M, H, E, D>
{
    type Output = Tensor<(B, S, Const<M>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, S, Const<M>), E, D, T>) -> Result<Self::Output, D::Err> {
        let (b, s, _) = *x.shape();
        if fused_stored::<E, D>() && b.size() > 0 && s.size() > 0 && M > 0 {
            let () = CausalSelfAttention::<M, H>::TYPE_CHECK;
            let qkv = self.c_attn.try_forward(x)?;
            return self
                .c_proj
                .try_forward(attend_packed_causal_cpu(qkv, H, Const::<M>)?);
        }
        self.attention(x, 0, |k, v| Ok::<_, D::Err>((k, v)))
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{check_input_grads, check_param_grads, named_grads, named_values};
    use crate::layers::attention::reference::{assert_close, case};
    use crate::layers::cpu_fast::both_paths;
    use crate::prelude::*;

    type Dev = Cpu;

    #[test]
    fn matches_pytorch_forward_and_gradients() {
        both_paths(|_| matches_pytorch_forward_and_gradients_on_this_path());
    }

    fn matches_pytorch_forward_and_gradients_on_this_path() {
        let dev = Dev::default();
        let c = case("causal");
        let mut m = CausalSelfAttentionModule::<8, 2, f64, Dev> {
            c_attn: InProj {
                weight: c.param_tensor(&dev, "c_attn.weight", (ConstProd, Const)),
                bias: c.param_tensor(&dev, "c_attn.bias", (ConstProd,)),
            },
            c_proj: crate::layers::LinearModule {
                weight: c.param_tensor(&dev, "c_proj.weight", (Const, Const)),
                bias: c.param_tensor(&dev, "c_proj.bias", (Const,)),
            },
        };
        let x = c.tensor(&dev, "x", (Const::<2>, Const::<4>, Const::<8>));
        let g = dev.tensor_from_vec(c.g(), (Const::<2>, Const::<4>, Const::<8>));
        assert_close("y", &m.forward(x.clone()).as_vec(), &c.y(), 1e-12);
        let grads = (m.forward(x.leaky_trace()) * g)
            .sum::<Rank0, _>()
            .backward();
        assert_close("grad x", &grads.get(&x).as_vec(), &c.grad("x"), 1e-12);
        for (name, grad) in named_grads(&mut m, &grads) {
            assert_close(&format!("grad {name}"), &grad, &c.grad(&name), 1e-12);
        }
    }

    #[test]
    fn gradients_match_central_differences() {
        both_paths(|_| gradients_match_central_differences_on_this_path());
    }

    fn gradients_match_central_differences_on_this_path() {
        let dev = Dev::seed_from_u64(5);
        let mut m = dev.build_module::<CausalSelfAttention<8, 2>, f64>();
        let x: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let g: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let report = check_param_grads(&mut m, |m, grads| {
            (m.forward(x.trace(grads)) * g.clone()).sum()
        });
        assert_eq!(
            report.checked,
            <CausalSelfAttention<8, 2> as LayerInfo>::PARAMS
        );
        assert!(report.max_abs_err <= 1e-6, "params: {report}");
        eprintln!("causal attention params: {report}");
        let report = check_input_grads(&x, |x| (m.forward(x) * g.clone()).sum());
        assert!(report.max_abs_err <= 1e-6, "input: {report}");
        eprintln!("causal attention input: {report}");
        assert_eq!(
            m.num_trainable_params(),
            <CausalSelfAttention<8, 2> as LayerInfo>::PARAMS
        );
        let names: Vec<String> = named_values(&mut m).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "c_attn.weight",
                "c_attn.bias",
                "c_proj.weight",
                "c_proj.bias"
            ]
        );
    }

    #[test]
    fn a_later_token_does_not_change_earlier_outputs() {
        both_paths(|_| a_later_token_does_not_change_earlier_outputs_on_this_path());
    }

    fn a_later_token_does_not_change_earlier_outputs_on_this_path() {
        let dev = Dev::seed_from_u64(6);
        let m = dev.build_module::<CausalSelfAttention<8, 2>, f64>();
        let x: Tensor<Rank3<2, 4, 8>, f64, Dev> = dev.sample_normal();
        let y = m.forward(x.clone()).array();
        let mut xs = x.array();
        xs[0][2] = [3.0; 8];
        xs[1][3] = [-2.0; 8];
        let y2 = m.forward(dev.tensor(xs)).array();
        assert_eq!(y[0][..2], y2[0][..2]);
        assert_eq!(y[1][..3], y2[1][..3]);
        assert_ne!(y[0][2], y2[0][2]);
        assert_ne!(y[0][3], y2[0][3]);
        assert_ne!(y[1][3], y2[1][3]);
    }

    #[test]
    fn cached_generation_equals_the_full_forward() {
        both_paths(|_| cached_generation_equals_the_full_forward_on_this_path());
    }

    fn cached_generation_equals_the_full_forward_on_this_path() {
        let dev = Dev::seed_from_u64(7);
        let m = dev.build_module::<CausalSelfAttention<8, 2>, f64>();
        let x: Tensor<Rank3<2, 6, 8>, f64, Dev> = dev.sample_normal();
        let full = m.forward(x.clone());
        let mut cache = KvCache::new();
        let mut got = Vec::new();
        // A prompt of 3, then one token, then two at once.
        for (a, b) in [(0, 3), (3, 4), (4, 6)] {
            let y = m
                .try_forward_cached(x.clone().slice((.., a..b, ..)), &mut cache)
                .unwrap();
            assert_eq!(cache.len(), b);
            got.push(y);
        }
        for (i, (a, b)) in [(0, 3), (3, 4), (4, 6)].into_iter().enumerate() {
            let want = full.clone().slice((.., a..b, ..)).as_vec();
            assert_close(&format!("tokens {a}..{b}"), &got[i].as_vec(), &want, 1e-12);
        }
        // A cache filled for a batch of 2 cannot serve a batch of 1.
        let one: Tensor<(usize, usize, Const<8>), f64, Dev> = dev.zeros_like(&(1, 1, Const));
        let msg = m
            .try_forward_cached(one, &mut cache)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("2 sequences") && msg.contains("clear()"),
            "{msg}"
        );
        assert_eq!(cache.len(), 6, "a failed call leaves the cache as it was");
        cache.clear();
        assert!(cache.is_empty());
    }
}
