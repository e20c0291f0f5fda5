//! Multi-head self-attention, for now on dfdx's implementation (no mask).

use super::LayerInfo;
use crate::Elem;
use dfdx::nn::modules::MultiHeadAttention;
use dfdx::nn::{BuildOnDevice, Module, ModuleVisitor, NonMutableModule, TensorCollection};
use dfdx::shapes::{Const, Dim, Dtype};
use dfdx::tensor::{Storage, Tape, Tensor};
use dfdx::tensor_ops::Device;

/// Multi-head self-attention without a mask: `[*, S, M] -> [*, S, M]`, with `H` heads over
/// query/key width `K` and value width `V` (both `M` by default); `H` must divide `K` and `V`,
/// which `model!` checks at compile time.
///
/// `softmax(Q Kᵀ / √(K/H)) V` per head, `Q = x W_qᵀ + b_q` and likewise for keys and values,
/// then the heads are concatenated and projected by `w_o`. Parameters `w_q`, `w_k`, `w_v`,
/// `w_o` (each a `Linear`). PyTorch: `torch.nn.MultiheadAttention(M, H, batch_first=True)`
/// called as `attn(x, x, x)`.
///
/// Only self-attention for now: dfdx's cross-attention takes keys and values without a gradient
/// tape, so a `forward` body could not train through them. Masks (causal, padding), cross and
/// grouped-query attention come with the layer library.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SelfAttention<const M: usize, const H: usize, const K: usize = M, const V: usize = M>;

/// The built [`SelfAttention`]: dfdx's attention, with the same parameter names.
#[derive(Debug, Clone)]
pub struct SelfAttentionModule<
    const M: usize,
    const H: usize,
    const K: usize,
    const V: usize,
    E: Dtype,
    D: Storage<E>,
>(pub MultiHeadAttention<M, H, K, V, E, D>);

impl<const M: usize, const H: usize, const K: usize, const V: usize> LayerInfo
    for SelfAttention<M, H, K, V>
{
    const PARAMS: usize = 2 * (M * K + K) + (M * V + V) + (V * M + M);
}

impl<const M: usize, const H: usize, const K: usize, const V: usize, E: Elem, D: Device<E>>
    BuildOnDevice<D, E> for SelfAttention<M, H, K, V>
{
    type Built = SelfAttentionModule<M, H, K, V, E, D>;
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
                Self::module("w_q", |s| &s.0.w_q, |s| &mut s.0.w_q),
                Self::module("w_k", |s| &s.0.w_k, |s| &mut s.0.w_k),
                Self::module("w_v", |s| &s.0.w_v, |s| &mut s.0.w_v),
                Self::module("w_o", |s| &s.0.w_o, |s| &mut s.0.w_o),
            ),
            |(w_q, w_k, w_v, w_o)| SelfAttentionModule(MultiHeadAttention { w_q, w_k, w_v, w_o }),
        )
    }
}

macro_rules! self_attention_rank {
    ([$($b:ident),*]) => {
        impl<const M: usize, const H: usize, const K: usize, const V: usize, $($b: Dim,)* S: Dim, E: Elem, D: Device<E>, T: Tape<E, D>>
            Module<Tensor<($($b,)* S, Const<M>), E, D, T>> for SelfAttentionModule<M, H, K, V, E, D>
        {
            type Output = Tensor<($($b,)* S, Const<M>), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<($($b,)* S, Const<M>), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                self.0.try_forward(x)
            }
        }
    };
}
self_attention_rank!([]);
self_attention_rank!([B]);

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[test]
    fn keys_and_count_match_pytorch_layout() {
        let dev = Cpu::default();
        let a = dev.build_module::<SelfAttention<8, 2>, f32>();
        assert_eq!(
            a.num_trainable_params(),
            <SelfAttention<8, 2> as LayerInfo>::PARAMS
        );
        assert_eq!(<SelfAttention<8, 2> as LayerInfo>::PARAMS, 4 * (8 * 8 + 8));
        let y = a.forward(dev.sample_normal::<Rank3<2, 5, 8>>());
        assert_eq!(y.shape().1, Const::<5>);
    }
}
