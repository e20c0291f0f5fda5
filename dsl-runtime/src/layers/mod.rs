//! The layers that `model!` declarations are made of.
//!
//! Each layer is a *builder* type (a zero-sized description such as `Linear<784, 128>`) that
//! builds, on a device and for an element type, into a dfdx module holding the parameters.
//! Every layer implements [`LayerInfo`], which gives its compile-time parameter count.

mod activation;
mod attention;
mod batch_norm;
mod bias;
mod causal_attention;
mod conv;
pub(crate) mod cpu_fast;
pub mod dropout;
pub(crate) mod elementwise;
mod embedding;
mod first_token;
mod flatten;
mod fused_attention;
mod gqa;
mod layer_norm;
mod linear;
mod logit_scale;
mod patch;
mod pool;
mod residual;
mod rms_norm;
mod rope;
mod sdpa;
mod swiglu;
mod tokens;
mod unflatten;

pub(crate) use activation::{cast, Mask, Real};
pub use activation::{Gelu, GeluTanh, LogSoftmax, QuickGelu, ReLU, SiLU, Sigmoid, Softmax, Tanh};
pub use attention::{
    ConstProd, CrossAttention, CrossAttentionModule, InProj, InProjNoBias, KvCache, OutProjNoBias,
    SelfAttention, SelfAttentionModule,
};
pub use batch_norm::{BatchNorm2d, BatchNorm2dModule};
pub use bias::{Bias, BiasModule};
pub use causal_attention::{CausalSelfAttention, CausalSelfAttentionModule};
pub use conv::{Conv2d, Conv2dModule, PerGroup};
pub use dropout::{seed_dropout, Dropout};
pub use embedding::{Embedding, EmbeddingModule, PositionalEmbedding, PositionalEmbeddingModule};
pub use first_token::FirstToken;
pub use flatten::Flatten;
pub use gqa::{GqaAttention, GqaAttentionModule};
pub use layer_norm::{LayerNorm, LayerNormModule};
pub use linear::{linear, Linear, LinearModule, LinearNoBias, LinearNoBiasModule};
pub use logit_scale::{LogitScale, LogitScaleModule, LOGIT_SCALE_INIT};
pub use patch::{PatchEmbed, PatchEmbedModule};
pub use pool::{AvgPool2d, GlobalAvgPool, MaxPool2d};
pub use residual::{Residual, ResidualModule};
pub use rms_norm::{RMSNorm, RMSNormModule};
pub use rope::Rope;
pub use sdpa::{ScaledDotProductAttention, SdpaModule};
pub use swiglu::{SwiGLU, SwiGLUModule};
pub use tokens::{
    ClassEmbedding, ClassEmbeddingModule, ClsToken, ClsTokenModule, LearnedPositions,
    LearnedPositionsModule,
};
pub use unflatten::Unflatten2;

use crate::summary::SummaryRow;

/// Compile-time facts about a layer builder, used by `model!` for `PARAMS` and summaries.
pub trait LayerInfo {
    /// Trainable parameters of one instance of the layer.
    const PARAMS: usize;

    /// The layer's compile-time checks (heads dividing widths, ...) and its children's:
    /// evaluating it fails the build of any model that contains an impossible layer, nested at
    /// any depth. `()` for layers without checks.
    const CHECKS: () = ();

    /// Summary rows of the layer's children, named below `prefix` (empty for leaf layers).
    fn children(prefix: &str, depth: usize) -> Vec<SummaryRow> {
        let _ = (prefix, depth);
        Vec::new()
    }
}

/// `N` identical layers run one after the other; the DSL writes it `[L; N]`.
pub use dfdx::nn::builders::Repeated;

impl<L: LayerInfo, const N: usize> LayerInfo for Repeated<L, N> {
    const PARAMS: usize = N * L::PARAMS;
    const CHECKS: () = L::CHECKS;
    fn children(prefix: &str, depth: usize) -> Vec<SummaryRow> {
        // Listing all N copies would repeat the same table N times: show the first, as torchinfo
        // does with `depth`, and let the parent row carry the total.
        let mut rows = L::children(&format!("{prefix}.0"), depth);
        if N > 1 {
            rows.push(SummaryRow {
                depth,
                name: format!("{prefix}.1..{}", N - 1),
                layer: format!("{} more, same as {prefix}.0", N - 1),
                output: String::new(),
                params: (N - 1) * L::PARAMS,
            });
        }
        rows
    }
}
