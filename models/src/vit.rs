//! The Vision Transformer (ViT): an image cut into `P`×`P` patches, each a token, and a
//! Transformer encoder over them with a class token whose final state is classified
//! (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
//! Scale", <https://arxiv.org/abs/2010.11929>).
//!
//! Pre-LayerNorm blocks, `h = x + Attn(LN(x))`, `y = h + MLP(LN(h))`, exact GELU, learned
//! positions (one per patch and one for the class token), a final LayerNorm, LayerNorm
//! `ε = 1e-12`, and a linear classifier on the class token.
//!
//! It matches Hugging Face transformers' `ViTForImageClassification` (`modeling_vit.py`)
//! tensor for tensor, under the keys of its Hub checkpoints and of `save_pretrained`
//! (`vit.embeddings.cls_token`, `vit.encoder.layer.0.attention.attention.query.weight`, ...;
//! transformers 5 renames the modules in memory, `vit.layers.0.attention.q_proj`, but reads and
//! writes files in this layout).
//!
//! ```
//! use neural_arch::prelude::*;
//! use neural_arch_models::vit::VitParity;
//!
//! let dev = Cpu::default();
//! let vit = dev.build_module::<VitParity, f32>();
//! let images: Tensor<Rank4<2, 3, 16, 16>, f32, _> = dev.sample_normal();
//! let logits = vit.try_forward(images)?;
//! assert_eq!(logits.shape(), &(Const::<2>, Const::<5>));
//! # Ok::<(), ModelError>(())
//! ```
//!
//! Differences from Hugging Face: no position-embedding interpolation for other image sizes
//! (`interpolate_pos_encoding`), no mask tokens (`bool_masked_pos`), no dropout (HF's ViT
//! configs use 0).

use neural_arch::prelude::*;

// Every LayerNorm here is `LayerNorm<D, 12>`: `ε = 1e-12` (`layer_norm_eps`), not PyTorch's
// default 1e-5.

// Const parameters, in this order wherever they appear:
// - `IMG`: image height and width (`image_size`; 224 for ViT-B/16),
// - `P`: patch height and width, dividing `IMG` (`patch_size`, 16),
// - `C`: image channels (`num_channels`, 3),
// - `D`: width of the tokens (`hidden_size`, 768),
// - `L`: number of encoder layers (`num_hidden_layers`, 12),
// - `H`: attention heads, dividing `D` (`num_attention_heads`, 12),
// - `F`: width of the MLP (`intermediate_size`, 3072 = 4·768),
// - `K`: number of classes (`num_labels`, 1000 for ImageNet-1k),
// - `N`: tokens, `(IMG/P)² + 1` (the patches and the class token; 197 for ViT-B/16): stable
//   Rust cannot compute it from `IMG` and `P` in a type, so it is a parameter, and a preset
//   states it; a wrong `N` is an error naming it when the model runs.

/// The number of tokens of an `img`×`img` image cut into `p`×`p` patches, with the class
/// token: `(img/p)² + 1`, the `N` parameter.
pub const fn tokens(img: usize, p: usize) -> usize {
    (img / p) * (img / p) + 1
}

model! {
    /// Patches to tokens, the class token first, plus learned positions: `[B, C, IMG, IMG] ->
    /// [B, N, D]`. HF `ViTEmbeddings` (`vit.embeddings.*`).
    pub struct ViTEmbeddings<const P: usize, const C: usize, const D: usize, const N: usize> {
        /// `projection`: a `P`×`P` convolution with stride `P`, `C` to `D` channels.
        patch_embeddings: PatchEmbed<C, D, P>,
        /// `[1, 1, D]`.
        cls_token: ClsToken<D>,
        /// `[1, N, D]`.
        position_embeddings: LearnedPositions<N, D>,
    }
}

model! {
    /// Multi-head self-attention over all tokens, `softmax(QKᵀ/√(D/H))·V`. HF
    /// `ViTSelfAttention` (`attention.attention`).
    pub struct ViTSelfAttention<const D: usize, const H: usize> {
        query: Linear<D, D>,
        key: Linear<D, D>,
        value: Linear<D, D>,
        attend: ScaledDotProductAttention<H>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        attend(query(x), key(x), value(x))
    }
}

model! {
    /// The attention's output projection. HF `ViTSelfOutput` (`attention.output`).
    pub struct ViTSelfOutput<const D: usize> {
        dense: Linear<D, D>,
    }
    forward(x: [B, T, D]) -> [B, T, D];
}

model! {
    /// Attention and its projection. HF `ViTAttention` (`attention`).
    pub struct ViTAttention<const D: usize, const H: usize> {
        attention: ViTSelfAttention<D, H>,
        output: ViTSelfOutput<D>,
    }
    forward(x: [B, T, D]) -> [B, T, D];
}

model! {
    /// The MLP's expansion, `GELU(dense(x))` (exact GELU). HF `ViTIntermediate`
    /// (`intermediate`).
    pub struct ViTIntermediate<const D: usize, const F: usize> {
        dense: Linear<D, F>,
        act: Gelu,
    }
    forward(x: [B, T, D]) -> [B, T, F];
}

model! {
    /// The MLP's contraction and the residual, `dense(h) + x`. HF `ViTOutput` (`output`).
    pub struct ViTOutput<const D: usize, const F: usize> {
        dense: Linear<F, D>,
    }
    forward(h: [B, T, F], x: [B, T, D]) -> [B, T, D] {
        dense(h) + x
    }
}

model! {
    /// One pre-LN encoder layer: `h = x + attention(LN(x))`, `y = h + MLP(LN(h))`. HF
    /// `ViTLayer` (`encoder.layer.{i}`).
    pub struct ViTLayer<const D: usize, const H: usize, const F: usize> {
        layernorm_before: LayerNorm<D, 12>,
        attention: ViTAttention<D, H>,
        layernorm_after: LayerNorm<D, 12>,
        intermediate: ViTIntermediate<D, F>,
        output: ViTOutput<D, F>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let h = attention(layernorm_before(x)) + x;
        output(intermediate(layernorm_after(h)), h)
    }
}

model! {
    /// `L` encoder layers. HF `ViTEncoder` (`encoder`).
    pub struct ViTEncoder<const D: usize, const L: usize, const H: usize, const F: usize> {
        layer: [ViTLayer<D, H, F>; L],
    }
    forward(x: [B, T, D]) -> [B, T, D];
}

model! {
    /// The ViT trunk: embeddings, `L` layers, the final LayerNorm; `[B, C, IMG, IMG]` to the
    /// token states `[B, N, D]` (the sequence length is a runtime `usize`). HF
    /// `ViTModel(config, add_pooling_layer=False)` (`vit.*`).
    pub struct ViTModel<
        const P: usize,
        const C: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
        const N: usize,
    > {
        embeddings: ViTEmbeddings<P, C, D, N>,
        encoder: ViTEncoder<D, L, H, F>,
        layernorm: LayerNorm<D, 12>,
    }
}

model! {
    /// ViT for image classification: `classifier(vit(x)[:, 0])`, `K` logits per image, read
    /// from the class token. HF `ViTForImageClassification`; train it with `cross_entropy`.
    #[checkpoint(base = "vit.")]
    pub struct ViTForImageClassification<
        const IMG: usize,
        const P: usize,
        const C: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
        const K: usize,
        const N: usize,
    > {
        vit: ViTModel<P, C, D, L, H, F, N>,
        first: FirstToken,
        classifier: Linear<D, K>,
    }
    forward(pixel_values: [B, C, IMG, IMG]) -> [B, K] {
        classifier(first(vit(pixel_values)))
    }
}

/// ViT-B/16 for ImageNet-1k (`google/vit-base-patch16-224`): 224×224 RGB, patches 16×16 (196
/// and the class token), width 768, 12 layers, 12 heads, MLP 3072, 1000 classes; 86.6 M
/// parameters.
pub type VitB16 = ViTForImageClassification<224, 16, 3, 768, 12, 12, 3072, 1000, 197>;
const _: () = assert!(VitB16::PARAMS == 86_567_656 && tokens(224, 16) == 197);

/// A ViT that trains on two CPU cores in minutes, for 10 classes of 32×32 RGB images: CIFAR-10,
/// or Fashion-MNIST padded from 28 to 32 pixels and repeated to 3 channels (the trainer's
/// CIFAR-shaped input). Patches 4×4 (64 and the class token), width 128, 4 layers, 4 heads,
/// MLP 512 (0.8 M parameters).
pub type VitTiny = ViTForImageClassification<32, 4, 3, 128, 4, 4, 512, 10, 65>;
const _: () = assert!(tokens(32, 4) == 65);

/// The parity-test ViT (`tools/reference/arch_vit.py`): 16×16 RGB, patches 4×4, width 32, 2
/// layers, 2 heads, MLP 64, 5 classes.
pub type VitParity = ViTForImageClassification<16, 4, 3, 32, 2, 2, 64, 5, 17>;
const _: () = assert!(tokens(16, 4) == 17);

/// Every preset with its summary, for the `model-summary` command.
pub const PRESETS: crate::Presets = &[
    ("tiny", VitTiny::summary),
    ("b16", VitB16::summary),
    ("parity", VitParity::summary),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_const_equals_built_count() {
        let dev = Cpu::default();
        let m = dev.build_module::<VitParity, f32>();
        assert_eq!(VitParity::PARAMS, m.num_trainable_params());
        let t = dev.build_module::<VitTiny, f32>();
        assert_eq!(VitTiny::PARAMS, t.num_trainable_params());
        assert_eq!(m.vit.layernorm.eps, 1e-12);
    }

    #[test]
    fn keys_are_hugging_face_names() {
        let dev = Cpu::default();
        let m = dev.build_module::<VitParity, f32>();
        let names = neural_arch::checkpoint::tensor_shapes(&m);
        for (k, shape) in [
            ("vit.embeddings.cls_token", vec![1, 1, 32]),
            ("vit.embeddings.position_embeddings", vec![1, 17, 32]),
            (
                "vit.embeddings.patch_embeddings.projection.weight",
                vec![32, 3, 4, 4],
            ),
            (
                "vit.encoder.layer.1.attention.attention.query.weight",
                vec![32, 32],
            ),
            ("vit.encoder.layer.0.attention.output.dense.bias", vec![32]),
            (
                "vit.encoder.layer.0.intermediate.dense.weight",
                vec![64, 32],
            ),
            ("vit.encoder.layer.0.output.dense.weight", vec![32, 64]),
            ("vit.encoder.layer.1.layernorm_after.weight", vec![32]),
            ("vit.layernorm.bias", vec![32]),
            ("classifier.weight", vec![5, 32]),
        ] {
            assert!(
                names.iter().any(|(n, s)| n == k && *s == shape),
                "{k} {shape:?} missing from {names:?}"
            );
        }
    }

    #[test]
    fn every_preset_summarises() {
        for (name, summary) in PRESETS {
            let s = summary();
            assert!(s.total_params > 0 && !s.rows.is_empty(), "{name}");
        }
        assert_eq!(VitB16::summary().total_params, 86_567_656);
    }

    #[test]
    fn runs_on_a_runtime_batch() {
        let dev = Cpu::default();
        let m = dev.build_module::<VitParity, f32>();
        let x: Tensor<(usize, Const<3>, Const<16>, Const<16>), f32, _> =
            dev.zeros_like(&(3, Const, Const, Const));
        assert_eq!(m.forward(x).shape(), &(3, Const::<5>));
    }

    #[test]
    fn a_wrong_token_count_is_an_error_naming_it() {
        // N = 16 instead of 17: the class token was forgotten.
        let dev = Cpu::default();
        let m = dev.build_module::<ViTForImageClassification<16, 4, 3, 8, 1, 2, 16, 2, 16>, f32>();
        let x: Tensor<Rank4<1, 3, 16, 16>, f32, _> = dev.zeros();
        let e = m.try_forward(x).unwrap_err().to_string();
        assert!(e.contains("LearnedPositions<16, 8>"), "{e}");
    }
}
