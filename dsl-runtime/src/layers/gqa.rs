//! Llama's grouped-query attention: causal, with RoPE, and a key/value cache for generation.
#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use super::attention::{causal_attend, ConstProd, InProjNoBias, KvCache, OutProjNoBias};
use super::rope::apply_rope;
use super::LayerInfo;
use crate::{Elem, Error};
use dfdx::nn::{BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection};
use dfdx::shapes::{Axes4, Const, Dim, Dtype, HasShape};
use dfdx::tensor::{HasErr, NoneTape, Storage, Tape, Tensor};
use dfdx::tensor_ops::{Device, PermuteTo, ReshapeTo};

/// Grouped-query attention (Ainslie et al., <https://arxiv.org/abs/2305.13245>) as in Llama 2
/// and 3: `H` query heads share `KVH` key/value heads (`KVH | H`; `KVH = H` is multi-head
/// attention, `KVH = 1` multi-query attention), each of width `HD`, with rotary position
/// embeddings ([`super::Rope`], base `THETA`) on queries and keys and a causal mask:
/// `[B, T, M] -> [B, T, M]`.
///
/// `Q = x W_qᵀ` (`H` heads), `K = x W_kᵀ`, `V = x W_vᵀ` (`KVH` heads); `Q, K ← RoPE(Q), RoPE(K)`;
/// query head `h` attends with key/value head `h / (H/KVH)`:
/// `softmax(Q_h K_gᵀ / √HD + causal mask) V_g`; heads merged, then `o_proj`.
///
/// Parameters named as in Hugging Face's `LlamaAttention`, no biases: `q_proj.weight`
/// `[H·HD, M]`, `k_proj.weight` and `v_proj.weight` `[KVH·HD, M]`, `o_proj.weight` `[M, H·HD]`.
/// `KVH` must divide `H` and `HD` must be even: compile-time assertions.
///
/// For generation, [`GqaAttentionModule::try_forward_cached`] takes only the new tokens and a
/// [`KvCache`] (which holds `KVH` heads, `H/KVH` times smaller than multi-head attention's);
/// its outputs equal the full forward's.
///
/// # Shapes
/// `x: [B, T, M]` → `[B, T, M]`.
///
/// ```
/// use neural_arch::prelude::*;
/// let dev = Cpu::default();
/// // Width 16, 4 query heads sharing 2 key/value heads, of width 4.
/// let attn = dev.build_module::<GqaAttention<16, 4, 2, 4>, f32>();
/// let x: Tensor<Rank3<1, 6, 16>, f32, _> = dev.sample_normal();
/// let y = attn.forward(x);
/// assert_eq!(y.shape().1, Const::<6>);
/// assert_eq!(<GqaAttention<16, 4, 2, 4> as LayerInfo>::PARAMS, 2 * 16 * 16 + 2 * 8 * 16);
/// ```
///
/// The head counts are checked when the layer is built or run: 3 key/value heads cannot serve
/// 4 query heads, and a compile-time assertion says so.
///
/// ```compile_fail
/// # use neural_arch::prelude::*;
/// let attn = Cpu::default().build_module::<GqaAttention<16, 4, 3, 4>, f32>();
/// ```
///
/// PyTorch (Hugging Face `transformers`): `LlamaAttention` with `hidden_size=M`,
/// `num_attention_heads=H`, `num_key_value_heads=KVH`, `head_dim=HD`, `rope_theta=THETA`,
/// `attention_bias=False`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GqaAttention<
    const M: usize,
    const H: usize,
    const KVH: usize,
    const HD: usize,
    const THETA: usize = 10000,
>;

impl<const M: usize, const H: usize, const KVH: usize, const HD: usize, const THETA: usize>
    GqaAttention<M, H, KVH, HD, THETA>
{
    const TYPE_CHECK: () = {
        assert!(
            KVH > 0 && H.is_multiple_of(KVH),
            "GqaAttention<M, H, KVH, HD>: the key/value heads KVH must divide the query heads H"
        );
        assert!(
            HD > 0 && HD.is_multiple_of(2),
            "GqaAttention<M, H, KVH, HD>: RoPE rotates pairs of values, so the head width HD must be even"
        );
    };
}

/// The built [`GqaAttention`].
#[derive(Debug, Clone)]
pub struct GqaAttentionModule<
    const M: usize,
    const H: usize,
    const KVH: usize,
    const HD: usize,
    const THETA: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// Query projection, `[H·HD, M]`.
    pub q_proj: InProjNoBias<M, H, HD, E, D>,
    /// Key projection, `[KVH·HD, M]`.
    pub k_proj: InProjNoBias<M, KVH, HD, E, D>,
    /// Value projection, `[KVH·HD, M]`.
    pub v_proj: InProjNoBias<M, KVH, HD, E, D>,
    /// Output projection, `[M, H·HD]`.
    pub o_proj: OutProjNoBias<H, HD, M, E, D>,
}

impl<const M: usize, const H: usize, const KVH: usize, const HD: usize, const THETA: usize>
    LayerInfo for GqaAttention<M, H, KVH, HD, THETA>
{
    const PARAMS: usize = 2 * M * H * HD + 2 * M * KVH * HD;
    const CHECKS: () = Self::TYPE_CHECK;
}

impl<
        const M: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const THETA: usize,
        E: Elem,
        D: Device<E>,
    > BuildOnDevice<D, E> for GqaAttention<M, H, KVH, HD, THETA>
{
    type Built = GqaAttentionModule<M, H, KVH, HD, THETA, E, D>;
    fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
        let () = GqaAttention::<M, H, KVH, HD, THETA>::TYPE_CHECK;
        dfdx::nn::BuildModule::try_build(device)
    }
}

impl<
        const M: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const THETA: usize,
        E: Dtype,
        D: Storage<E>,
    > NonMutableModule for GqaAttentionModule<M, H, KVH, HD, THETA, E, D>
{
}

impl<
        const M: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const THETA: usize,
        E: Elem,
        D: Device<E>,
    > TensorCollection<E, D> for GqaAttentionModule<M, H, KVH, HD, THETA, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = GqaAttentionModule<M, H, KVH, HD, THETA, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("q_proj", |s| &s.q_proj, |s| &mut s.q_proj),
                Self::module("k_proj", |s| &s.k_proj, |s| &mut s.k_proj),
                Self::module("v_proj", |s| &s.v_proj, |s| &mut s.v_proj),
                Self::module("o_proj", |s| &s.o_proj, |s| &mut s.o_proj),
            ),
            |(q_proj, k_proj, v_proj, o_proj)| GqaAttentionModule {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
            },
        )
    }
}

/// Keys or values `(B, KVH, S, HD)`.
type Heads<B, S, E, D, T> = Tensor<(B, usize, S, usize), E, D, T>;

impl<
        const M: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const THETA: usize,
        E: Elem,
        D: Device<E>,
    > GqaAttentionModule<M, H, KVH, HD, THETA, E, D>
{
    /// `[B, S, heads·HD]` to `(B, heads, S, HD)`, rotated for positions `past..past + S`.
    fn heads<B: Dim, S: Dim, W: Dim, Tp: Tape<E, D>>(
        x: Tensor<(B, S, W), E, D, Tp>,
        heads: usize,
        past: Option<usize>,
    ) -> Result<Heads<B, S, E, D, Tp>, D::Err> {
        let (b, s, _) = *x.shape();
        let x = x
            .try_reshape_like(&(b, s, heads, HD))?
            .try_permute::<_, Axes4<0, 2, 1, 3>>()?;
        match past {
            // RoPE writes a fresh (B, heads, S, HD) tensor, the layout the cache keeps.
            Some(past) => apply_rope(x, past, THETA as f64),
            None => Ok(x),
        }
    }

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
        let () = GqaAttention::<M, H, KVH, HD, THETA>::TYPE_CHECK;
        let q = Self::heads(self.q_proj.try_forward(x.retaped::<Tp>())?, H, Some(past))?;
        let k = Self::heads(self.k_proj.try_forward(x.retaped::<Tp>())?, KVH, Some(past))?;
        let v = Self::heads(self.v_proj.try_forward(x)?, KVH, None)?;
        let (k, v) = kv(k, v)?;
        let y = causal_attend(q, k, v, past, ConstProd::<H, HD>)?;
        Ok(self.o_proj.try_forward(y)?)
    }

    /// The outputs for the new tokens `x` `[B, S, M]`, at the positions after the cached ones
    /// (RoPE included), attending over the cached positions and themselves; their keys and
    /// values are appended to `cache`. Over a sequence fed in any number of pieces the outputs
    /// equal [`Module::forward`] on the whole sequence.
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
            cache.extend("GqaAttention::try_forward_cached", k, v)
        })
    }
}

impl<
        const M: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const THETA: usize,
        B: Dim,
        S: Dim,
        E: Elem,
        D: Device<E>,
        T: Tape<E, D>,
    > Module<Tensor<(B, S, Const<M>), E, D, T>> for GqaAttentionModule<M, H, KVH, HD, THETA, E, D>
{
    type Output = Tensor<(B, S, Const<M>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, S, Const<M>), E, D, T>) -> Result<Self::Output, D::Err> {
        self.attention(x, 0, |k, v| Ok::<_, D::Err>((k, v)))
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{check_input_grads, check_param_grads, named_grads, named_values};
    use crate::layers::attention::reference::{assert_close, case, Case};
    use crate::layers::cpu_fast::both_paths;
    use crate::prelude::*;

    type Dev = Cpu;

    fn from_reference<
        const M: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const TH: usize,
    >(
        c: &Case,
        dev: &Dev,
    ) -> GqaAttentionModule<M, H, KVH, HD, TH, f64, Dev> {
        assert_eq!(
            [
                c.config("m"),
                c.config("h"),
                c.config("kvh"),
                c.config("hd"),
                c.config("theta")
            ],
            [M, H, KVH, HD, TH]
        );
        GqaAttentionModule {
            q_proj: InProjNoBias {
                weight: c.param_tensor(dev, "q_proj.weight", (ConstProd, Const)),
            },
            k_proj: InProjNoBias {
                weight: c.param_tensor(dev, "k_proj.weight", (ConstProd, Const)),
            },
            v_proj: InProjNoBias {
                weight: c.param_tensor(dev, "v_proj.weight", (ConstProd, Const)),
            },
            o_proj: OutProjNoBias {
                weight: c.param_tensor(dev, "o_proj.weight", (Const, ConstProd)),
            },
        }
    }

    fn check_against<
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const TH: usize,
        const B: usize,
        const T: usize,
    >(
        name: &str,
    ) {
        let dev = Dev::default();
        let c = case(name);
        let mut m = from_reference::<8, H, KVH, HD, TH>(&c, &dev);
        let x = c.tensor(&dev, "x", (Const::<B>, Const::<T>, Const::<8>));
        let g = dev.tensor_from_vec(c.g(), (Const::<B>, Const::<T>, Const::<8>));
        assert_close(
            &format!("{name} y"),
            &m.forward(x.clone()).as_vec(),
            &c.y(),
            1e-12,
        );
        let grads = (m.forward(x.leaky_trace()) * g)
            .sum::<Rank0, _>()
            .backward();
        assert_close(
            &format!("{name} grad x"),
            &grads.get(&x).as_vec(),
            &c.grad("x"),
            1e-12,
        );
        for (p, grad) in named_grads(&mut m, &grads) {
            assert_close(&format!("{name} grad {p}"), &grad, &c.grad(&p), 1e-12);
        }
    }

    #[test]
    fn matches_hugging_face_llama_attention() {
        both_paths(|_| matches_hugging_face_llama_attention_on_this_path());
    }

    fn matches_hugging_face_llama_attention_on_this_path() {
        check_against::<4, 2, 4, 10000, 2, 4>("gqa");
        check_against::<2, 2, 4, 10000, 2, 3>("gqa_kvh_equals_h");
        check_against::<4, 1, 2, 500000, 1, 5>("gqa_one_kv_head_theta");
    }

    #[test]
    fn grouped_query_attention_is_multi_head_attention_with_repeated_key_value_heads() {
        both_paths(|_| {
            grouped_query_attention_is_multi_head_attention_with_repeated_key_value_heads_on_this_path()
        });
    }

    fn grouped_query_attention_is_multi_head_attention_with_repeated_key_value_heads_on_this_path()
    {
        let dev = Dev::seed_from_u64(8);
        let gqa = dev.build_module::<GqaAttention<8, 4, 2, 2>, f64>();
        // The same layer as multi-head attention: key/value head g copied to heads 2g, 2g + 1.
        let repeat = |w: &Tensor<(ConstProd<2, 2>, Const<8>), f64, Dev>| {
            let rows = w.as_vec();
            let mut out = Vec::new();
            for h in 0..4 {
                let g = h / 2;
                out.extend_from_slice(&rows[g * 2 * 8..(g + 1) * 2 * 8]);
            }
            dev.tensor_from_vec(out, (ConstProd, Const::<8>))
        };
        let mha = GqaAttentionModule::<8, 4, 4, 2, 10000, f64, Dev> {
            q_proj: gqa.q_proj.clone(),
            k_proj: InProjNoBias {
                weight: repeat(&gqa.k_proj.weight),
            },
            v_proj: InProjNoBias {
                weight: repeat(&gqa.v_proj.weight),
            },
            o_proj: gqa.o_proj.clone(),
        };
        let x: Tensor<Rank3<2, 5, 8>, f64, Dev> = dev.sample_normal();
        assert_close(
            "gqa vs mha",
            &gqa.forward(x.clone()).as_vec(),
            &mha.forward(x).as_vec(),
            1e-13,
        );
    }

    #[test]
    fn gradients_match_central_differences() {
        both_paths(|_| gradients_match_central_differences_on_this_path());
    }

    fn gradients_match_central_differences_on_this_path() {
        let dev = Dev::seed_from_u64(9);
        let mut m = dev.build_module::<GqaAttention<8, 4, 2, 2>, f64>();
        let x: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let g: Tensor<Rank3<2, 3, 8>, f64, Dev> = dev.sample_normal();
        let report = check_param_grads(&mut m, |m, grads| {
            (m.forward(x.trace(grads)) * g.clone()).sum()
        });
        assert_eq!(
            report.checked,
            <GqaAttention<8, 4, 2, 2> as LayerInfo>::PARAMS
        );
        assert!(report.max_abs_err <= 1e-6, "params: {report}");
        eprintln!("gqa params: {report}");
        let report = check_input_grads(&x, |x| (m.forward(x) * g.clone()).sum());
        assert!(report.max_abs_err <= 1e-6, "input: {report}");
        eprintln!("gqa input: {report}");
        assert_eq!(
            m.num_trainable_params(),
            <GqaAttention<8, 4, 2, 2> as LayerInfo>::PARAMS
        );
        let names: Vec<String> = named_values(&mut m).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "q_proj.weight",
                "k_proj.weight",
                "v_proj.weight",
                "o_proj.weight"
            ]
        );
    }

    #[test]
    fn causal_and_cached_generation_equals_the_full_forward() {
        both_paths(|_| causal_and_cached_generation_equals_the_full_forward_on_this_path());
    }

    fn causal_and_cached_generation_equals_the_full_forward_on_this_path() {
        let dev = Dev::seed_from_u64(10);
        let m = dev.build_module::<GqaAttention<8, 4, 2, 2>, f64>();
        let x: Tensor<Rank3<2, 6, 8>, f64, Dev> = dev.sample_normal();
        let full = m.forward(x.clone());

        // The future does not leak into the past.
        let mut xs = x.array();
        xs[1][4] = [1.5; 8];
        let changed = m.forward(dev.tensor(xs)).array();
        assert_eq!(full.array()[1][..4], changed[1][..4]);
        assert_ne!(full.array()[1][4], changed[1][4]);

        let mut cache = KvCache::new();
        for (a, b) in [(0, 2), (2, 3), (3, 4), (4, 6)] {
            let y = m
                .try_forward_cached(x.clone().slice((.., a..b, ..)), &mut cache)
                .unwrap();
            let want = full.clone().slice((.., a..b, ..)).as_vec();
            assert_close(&format!("tokens {a}..{b}"), &y.as_vec(), &want, 1e-12);
        }
        // The cache holds the 2 key/value heads, not the 4 query heads.
        let (k, _) = cache.keys_values().unwrap();
        assert_eq!(k.shape().concrete(), [2, 2, 6, 2]);

        // A cache of another layer shape is refused.
        let other = dev.build_module::<GqaAttention<8, 4, 4, 2>, f64>();
        let x1: Tensor<Rank3<2, 1, 8>, f64, Dev> = dev.sample_normal();
        let msg = other
            .try_forward_cached(x1, &mut cache)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("GqaAttention") && msg.contains("2 key/value heads"),
            "{msg}"
        );
    }
}
