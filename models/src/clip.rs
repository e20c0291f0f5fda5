//! CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
//! Supervision", <https://arxiv.org/abs/2103.00020>): a text transformer and a vision
//! transformer trained together so that an image and its caption land close in a shared
//! embedding space. The text tower is a causal (GPT-style) pre-norm transformer read at the
//! end-of-text token; the vision tower is a ViT read at its class token; both are projected
//! (no bias) to the same width, L2-normalised and compared by a cosine similarity scaled by a
//! learned `exp(logit_scale)`. Trained with a symmetric contrastive loss; used zero-shot by
//! comparing an image with captions of every class ("a photo of a {class}").
//!
//! This file matches Hugging Face `transformers`' `CLIPModel` (`CLIPTextTransformer`,
//! `CLIPVisionTransformer`, `CLIPEncoderLayer`, `CLIPAttention`, `CLIPMLP`): the same layers and
//! `state_dict` keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
//! `vision_model.pre_layrnorm.weight` with upstream's spelling, `logit_scale`, ...), and OpenAI's
//! `quick_gelu`. Transformers 5.x does not save the `position_ids` buffers; files from older
//! versions that hold them load too (they are skipped).
//!
//! Differences from Hugging Face: the text tower takes no `attention_mask` (with causal
//! attention and the pooling at the first end-of-text token, right padding cannot change the
//! result, and CLIP's tokenizer pads on the right); images must have the preset's size (no
//! `interpolate_pos_encoding`); freshly built weights follow dfdx's and this crate's
//! initialisers, not Hugging Face's `_init_weights` (load a checkpoint, or train from them).
//!
//! ```
//! use neural_arch::prelude::*;
//! use neural_arch_models::clip::{similarity_logits, ClipParity, ClipVitB32};
//!
//! assert_eq!(ClipVitB32::PARAMS, 151_277_313); // Hugging Face's count, at compile time
//! let dev = Cpu::default();
//! let clip = dev.build_module::<ClipParity, f32>();
//! // Two captions, each ending in the end-of-text token 60, and two 16×16 images.
//! let ids = dev.tensor([[0usize, 5, 9, 60, 60, 60, 60, 60], [0, 7, 60, 60, 60, 60, 60, 60]]);
//! let images: Tensor<Rank4<2, 3, 16, 16>, f32, _> = dev.sample_normal();
//! let (text, image) = clip.try_forward((ids, images))?;
//! let logits_per_image = similarity_logits(image, text, &clip.logit_scale)?;
//! assert_eq!(logits_per_image.shape(), &(Const::<2>, Const::<2>));
//! # Ok::<(), neural_arch::Error>(())
//! ```

use neural_arch::layers::LayerInfo;
use neural_arch::prelude::*;
use neural_arch::Error;

// ---------------------------------------------------------------------------------------------
// Small layers CLIP needs
// ---------------------------------------------------------------------------------------------

/// The feature map of a patch convolution as a sequence of tokens, row by row:
/// `[B, D, GH, GW] -> [B, GH·GW, D]`, PyTorch's `x.flatten(2).transpose(1, 2)`. No parameters.
///
/// With a `Conv2d<C, D, P, P>` before it (kernel = stride = patch size) this is ViT's patch
/// embedding; CLIP's has no bias, which [`PatchEmbed`] has, hence the pair.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImageToTokens;

impl neural_arch::dfdx::nn::ZeroSizedModule for ImageToTokens {}
impl neural_arch::dfdx::nn::NonMutableModule for ImageToTokens {}
impl LayerInfo for ImageToTokens {
    const PARAMS: usize = 0;
}

impl<B: Dim, const M: usize, H: Dim, W: Dim, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, Const<M>, H, W), E, D, T>> for ImageToTokens
{
    type Output = Tensor<(B, usize, Const<M>), E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<(B, Const<M>, H, W), E, D, T>) -> Result<Self::Output, D::Err> {
        let (b, _, h, w) = *x.shape();
        x.try_reshape_like(&(b, Const::<M>, h.size() * w.size()))?
            .try_permute::<_, Axes3<0, 2, 1>>()
    }
}

/// The first token of each sequence, `[B, T, D] -> [B, D]`: the class token a ViT (and
/// CLIP's vision tower) classifies from, PyTorch's `x[:, 0, :]`. No parameters. An empty
/// sequence is an [`Error::Shape`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FirstToken;

impl neural_arch::dfdx::nn::ZeroSizedModule for FirstToken {}
impl neural_arch::dfdx::nn::NonMutableModule for FirstToken {}
impl LayerInfo for FirstToken {
    const PARAMS: usize = 0;
}

impl<B: Dim, S: Dim, const M: usize, E: Dtype, D: Device<E>, T: Tape<E, D>>
    Module<Tensor<(B, S, Const<M>), E, D, T>> for FirstToken
where
    Error: From<D::Err>,
{
    type Output = Tensor<(B, Const<M>), E, D, T>;
    type Error = Error;

    fn try_forward(&self, x: Tensor<(B, S, Const<M>), E, D, T>) -> Result<Self::Output, Error> {
        let (b, s, _) = *x.shape();
        if s.size() == 0 {
            return Err(Error::Shape(
                "FirstToken: the sequences are empty, there is no first token".into(),
            ));
        }
        let idx = x
            .device()
            .try_tensor_from_vec(vec![0usize; b.size()], (b,))?;
        Ok(x.try_select(idx)?)
    }
}

/// The hidden state at each sequence's end-of-text token: `(h [B, T, D], ids usize[B, T]) ->
/// [B, D]`, the pooled output of CLIP's text tower. No parameters.
///
/// The position is chosen exactly as Hugging Face's `CLIPTextTransformer` (transformers 4.31
/// and later, 5.x included) chooses it from the config's `eos_token_id`:
/// - `EOS == 2`: the position of the largest id, the first one on ties
///   (`input_ids.argmax(-1)`): the legacy rule for configs written before transformers PR
///   #24773, which said 2; CLIP's end-of-text token 49407 is the largest id of its vocabulary;
/// - any other `EOS`: the first position holding `EOS` (padding may repeat it after).
///
/// On tokenizer output both rules pick the same position, the first `<|endoftext|>`. A
/// sequence without `EOS` (rule 2) is an [`Error::Shape`] naming it (Hugging Face would silently
/// read position 0), as are ids and states of different sizes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EosPool<const EOS: usize>;

impl<const EOS: usize> neural_arch::dfdx::nn::ZeroSizedModule for EosPool<EOS> {}
impl<const EOS: usize> neural_arch::dfdx::nn::NonMutableModule for EosPool<EOS> {}
impl<const EOS: usize> LayerInfo for EosPool<EOS> {
    const PARAMS: usize = 0;
}

impl<const EOS: usize> EosPool<EOS> {
    /// The pooled position of every row of `ids` (`t` ids per row).
    pub fn positions(ids: &[usize], t: usize) -> Result<Vec<usize>, Error> {
        if t == 0 {
            return Err(Error::Shape(
                "EosPool: the sequences are empty; each needs an end-of-text token".into(),
            ));
        }
        ids.chunks(t)
            .enumerate()
            .map(|(row, r)| {
                if EOS == 2 {
                    // The first maximum, as torch.argmax returns.
                    let mut best = 0;
                    for (i, &v) in r.iter().enumerate() {
                        if v > r[best] {
                            best = i;
                        }
                    }
                    Ok(best)
                } else {
                    r.iter().position(|&v| v == EOS).ok_or_else(|| {
                        Error::Shape(format!(
                            "EosPool: sequence {row} has no end-of-text token {EOS}: {r:?}; \
                             CLIP reads the text's embedding there, so the tokenizer must \
                             append it"
                        ))
                    })
                }
            })
            .collect()
    }
}

impl<const EOS: usize, B: Dim, S: Dim, const M: usize, E: Dtype, D: Device<E>, T>
    Module<(
        Tensor<(B, S, Const<M>), E, D, T>,
        Tensor<(B, S), usize, D, T>,
    )> for EosPool<EOS>
where
    T: Tape<E, D> + Merge<T>,
    Error: From<D::Err>,
{
    type Output = Tensor<(B, Const<M>), E, D, T>;
    type Error = Error;

    fn try_forward(
        &self,
        (h, ids): (
            Tensor<(B, S, Const<M>), E, D, T>,
            Tensor<(B, S), usize, D, T>,
        ),
    ) -> Result<Self::Output, Error> {
        let (b, s, _) = *h.shape();
        let (ib, is) = *ids.shape();
        if (ib.size(), is.size()) != (b.size(), s.size()) {
            return Err(Error::Shape(format!(
                "EosPool: the hidden states are [{}, {}, {M}] but the ids [{}, {}]; they must \
                 have the same batch and length",
                b.size(),
                s.size(),
                ib.size(),
                is.size()
            )));
        }
        // The ids carry the tape of the embedding's gradients: it goes on with the output.
        let (ids, ids_tape) = ids.split_tape();
        let pos = Self::positions(&ids.as_vec(), s.size())?;
        let (h, h_tape) = h.split_tape();
        let idx = h.device().try_tensor_from_vec(pos, (b,))?;
        Ok(h.put_tape(h_tape.merge(ids_tape)).try_select(idx)?)
    }
}

// ---------------------------------------------------------------------------------------------
// The transformer blocks (shared by both towers)
// ---------------------------------------------------------------------------------------------

model! {
    /// Hugging Face `CLIPAttention` of the vision tower: `D` wide, `H` heads, every token sees
    /// every token; `out_proj(softmax(q kᵀ / √(D/H)) v)` with biased projections.
    pub struct ClipAttention<const D: usize, const H: usize> {
        q_proj: Linear<D, D>,
        k_proj: Linear<D, D>,
        v_proj: Linear<D, D>,
        attn: ScaledDotProductAttention<H>,
        out_proj: Linear<D, D>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        out_proj(attn(q_proj(x), k_proj(x), v_proj(x)))
    }
}

model! {
    /// [`ClipAttention`] with the causal mask of the text tower: token `i` sees tokens `0..=i`.
    pub struct ClipCausalAttention<const D: usize, const H: usize> {
        q_proj: Linear<D, D>,
        k_proj: Linear<D, D>,
        v_proj: Linear<D, D>,
        attn: ScaledDotProductAttention<H, true>,
        out_proj: Linear<D, D>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        out_proj(attn(q_proj(x), k_proj(x), v_proj(x)))
    }
}

model! {
    /// Hugging Face `CLIPMLP`: `fc2(quick_gelu(fc1(x)))`, `D → F → D`.
    pub struct ClipMlp<const D: usize, const F: usize> {
        fc1: Linear<D, F>,
        act: QuickGelu,
        fc2: Linear<F, D>,
    }
}

model! {
    /// Hugging Face `CLIPEncoderLayer` (vision tower): pre-norm,
    /// `x + self_attn(layer_norm1(x))`, then `x + mlp(layer_norm2(x))`; layer norms with
    /// ε = 1e-5.
    pub struct ClipEncoderLayer<const D: usize, const H: usize, const F: usize> {
        self_attn: ClipAttention<D, H>,
        layer_norm1: LayerNorm<D>,
        mlp: ClipMlp<D, F>,
        layer_norm2: LayerNorm<D>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let x = x + self_attn(layer_norm1(x));
        x + mlp(layer_norm2(x))
    }
}

model! {
    /// [`ClipEncoderLayer`] with causal attention (text tower).
    pub struct ClipCausalEncoderLayer<const D: usize, const H: usize, const F: usize> {
        self_attn: ClipCausalAttention<D, H>,
        layer_norm1: LayerNorm<D>,
        mlp: ClipMlp<D, F>,
        layer_norm2: LayerNorm<D>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let x = x + self_attn(layer_norm1(x));
        x + mlp(layer_norm2(x))
    }
}

model! {
    /// Hugging Face `CLIPEncoder` of the vision tower: `L` [`ClipEncoderLayer`]s,
    /// keyed `layers.0`, `layers.1`, ...
    pub struct ClipEncoder<const D: usize, const H: usize, const F: usize, const L: usize> {
        layers: [ClipEncoderLayer<D, H, F>; L],
    }
}

model! {
    /// Hugging Face `CLIPEncoder` of the text tower: `L` [`ClipCausalEncoderLayer`]s.
    pub struct ClipCausalEncoder<const D: usize, const H: usize, const F: usize, const L: usize> {
        layers: [ClipCausalEncoderLayer<D, H, F>; L],
    }
}

// ---------------------------------------------------------------------------------------------
// The towers
// ---------------------------------------------------------------------------------------------

model! {
    /// Hugging Face `CLIPTextEmbeddings`: `token_embedding(ids) + position_embedding[0..T]`,
    /// a vocabulary of `V`, at most `P` positions, `D` wide.
    pub struct ClipTextEmbeddings<const V: usize, const P: usize, const D: usize> {
        token_embedding: Embedding<V, D>,
        position_embedding: PositionalEmbedding<P, D>,
    }
}

model! {
    /// Hugging Face `CLIPTextTransformer`: embeddings, `L` causal pre-norm layers (`H` heads,
    /// MLP `F` wide), `final_layer_norm`, and the hidden state at the end-of-text token `EOS`
    /// ([`EosPool`]): `usize[B, T] -> [B, D]`, `T ≤ P`.
    pub struct ClipTextTransformer<
        const V: usize,
        const P: usize,
        const D: usize,
        const H: usize,
        const F: usize,
        const L: usize,
        const EOS: usize
    > {
        embeddings: ClipTextEmbeddings<V, P, D>,
        encoder: ClipCausalEncoder<D, H, F, L>,
        final_layer_norm: LayerNorm<D>,
        pool: EosPool<EOS>,
    }
    forward(ids: usize[B, T]) -> [B, D] {
        let h = final_layer_norm(encoder(embeddings(ids)));
        pool(h, ids)
    }
}

model! {
    /// Hugging Face `CLIPVisionEmbeddings`: `P`×`P` patches of a 3-channel image through a
    /// bias-free convolution (`patch_embedding`, a `G`×`G` grid), the class embedding in front,
    /// plus `position_embedding` (an `nn.Embedding` of `NP1 = G·G + 1` rows, one for the class
    /// token): `[B, 3, G·P, G·P] -> [B, NP1, D]`.
    pub struct ClipVisionEmbeddings<const D: usize, const P: usize, const G: usize, const NP1: usize> {
        patch_embedding: Conv2d<3, D, P, P, 0, 1, 1, false, Const<G>, Const<G>>,
        to_tokens: ImageToTokens,
        class_embedding: ClassEmbedding<D>,
        position_embedding: PositionalEmbedding<NP1, D>,
    }
}

model! {
    /// Hugging Face `CLIPVisionTransformer`: embeddings, `pre_layrnorm` (upstream's spelling),
    /// `L` pre-norm layers (`H` heads, MLP `F` wide), and `post_layernorm` of the class token:
    /// `[B, 3, IMG, IMG] -> [B, D]` with `IMG = G·P`.
    pub struct ClipVisionTransformer<
        const IMG: usize,
        const P: usize,
        const G: usize,
        const NP1: usize,
        const D: usize,
        const H: usize,
        const F: usize,
        const L: usize
    > {
        embeddings: ClipVisionEmbeddings<D, P, G, NP1>,
        pre_layrnorm: LayerNorm<D>,
        encoder: ClipEncoder<D, H, F, L>,
        cls: FirstToken,
        post_layernorm: LayerNorm<D>,
    }
    forward(x: [B, 3, IMG, IMG]) -> [B, D];
}

model! {
    /// Hugging Face `CLIPModel`: both towers, their bias-free projections to `PR` and the
    /// learned temperature `logit_scale`.
    ///
    /// Text: vocabulary `V`, `P` positions, width `DT`, `HT` heads, MLP `FT`, `LT` layers,
    /// end-of-text id `EOS` (see [`EosPool`]). Vision: `IMG`×`IMG` RGB images cut into `PS`×`PS`
    /// patches (a `G`×`G` grid, `G = IMG / PS`, `NP1 = G·G + 1` positions), width `DV`, `HV`
    /// heads, MLP `FV`, `LV` layers. `PR`: the shared embedding width.
    ///
    /// `forward((ids usize[B, T], images [N, 3, IMG, IMG]))` returns the projected, not yet
    /// normalised, features `(text [B, PR], image [N, PR])` (Hugging Face's
    /// `get_text_features` / `get_image_features`); [`normalize`] gives `text_embeds` /
    /// `image_embeds`, [`similarity_logits`] `logits_per_image` / `logits_per_text`,
    /// [`zero_shot_probabilities`] a zero-shot classifier, and [`clip_loss`] the training loss
    /// (`return_loss=True`).
    #[checkpoint(ignored("position_ids"))]
    pub struct ClipModel<
        const V: usize,
        const P: usize,
        const DT: usize,
        const HT: usize,
        const FT: usize,
        const LT: usize,
        const EOS: usize,
        const IMG: usize,
        const PS: usize,
        const G: usize,
        const NP1: usize,
        const DV: usize,
        const HV: usize,
        const FV: usize,
        const LV: usize,
        const PR: usize
    > {
        text_model: ClipTextTransformer<V, P, DT, HT, FT, LT, EOS>,
        vision_model: ClipVisionTransformer<IMG, PS, G, NP1, DV, HV, FV, LV>,
        visual_projection: LinearNoBias<DV, PR>,
        text_projection: LinearNoBias<DT, PR>,
        logit_scale: LogitScale,
    }
    forward(ids: usize[B, T], images: [N, 3, IMG, IMG]) -> ([B, PR], [N, PR]) {
        (text_projection(text_model(ids)), visual_projection(vision_model(images)))
    }
}

// ---------------------------------------------------------------------------------------------
// Presets
// ---------------------------------------------------------------------------------------------

/// OpenAI's CLIP ViT-B/32 (`openai/clip-vit-base-patch32`): text 49 408 tokens, 77 positions,
/// width 512, 12 layers, 8 heads, MLP 2048; vision 224×224, patches 32 (7×7 + 1 tokens), width
/// 768, 12 layers, 12 heads, MLP 3072; projection 512; 151 277 313 parameters.
pub type ClipVitB32 =
    ClipModel<49408, 77, 512, 8, 2048, 12, 49407, 224, 32, 7, 50, 768, 12, 3072, 12, 512>;

/// A small CLIP that trains on 2 CPU cores in minutes: 32×32 images (Fashion-MNIST padded and
/// repeated over 3 channels, CIFAR-10) in 4×4 patches, short captions (32 tokens of a
/// vocabulary of 8000, end-of-text 7999), both towers 128 wide with 3 layers of 4 heads,
/// projection 128. A training step on 64 image-caption pairs (16 tokens) takes about 2 s on 2
/// shared CPU cores (test profile).
pub type ClipTiny = ClipModel<8000, 32, 128, 4, 512, 3, 7999, 32, 4, 8, 65, 128, 4, 512, 3, 128>;

/// The parity-test preset (`tools/reference/arch_clip.py`): text vocabulary 64, 8 positions,
/// end-of-text 60; 16×16 images in 4×4 patches; both towers 32 wide, 2 layers of 4 heads,
/// MLP 37; projection 16; 32 789 parameters.
pub type ClipParity = ClipModel<64, 8, 32, 4, 37, 2, 60, 16, 4, 4, 17, 32, 4, 37, 2, 16>;

const _: () = assert!(ClipVitB32::PARAMS == 151_277_313);

/// Every preset with its summary, for `model-summary`.
pub const PRESETS: crate::Presets = &[
    ("parity", ClipParity::summary),
    ("tiny", ClipTiny::summary),
    ("vit-b-32", ClipVitB32::summary),
];

// ---------------------------------------------------------------------------------------------
// Heads
// ---------------------------------------------------------------------------------------------

/// Rows divided by their L2 norm: the projected features as Hugging Face's `text_embeds` /
/// `image_embeds` (`x / x.norm(p=2, dim=-1, keepdim=True)`, no ε).
pub fn normalize<N: Dim, const K: usize, E: Dtype, D: Device<E>, T>(
    x: Tensor<(N, Const<K>), E, D, T>,
) -> Result<Tensor<(N, Const<K>), E, D, T>, Error>
where
    T: Tape<E, D> + Merge<T>,
    Error: From<D::Err>,
{
    let shape = *x.shape();
    let norm = x
        .with_empty_tape()
        .try_square()?
        .try_sum::<(N,), Axis<1>>()?
        .try_sqrt()?
        .try_broadcast_like::<_, Axis<1>>(&shape)?;
    Ok(x.try_div(norm)?)
}

/// `exp(logit_scale) · â · b̂ᵀ` with rows normalised: `similarity_logits(image, text, s)` is
/// Hugging Face's `logits_per_image` `[N, M]`, `similarity_logits(text, image, s)` its
/// `logits_per_text` (the transpose). `a` and `b` are projected features (normalised or not).
pub fn similarity_logits<N: Dim, M: Dim, const K: usize, E: Dtype, D: Device<E>, T>(
    a: Tensor<(N, Const<K>), E, D, T>,
    b: Tensor<(M, Const<K>), E, D, T>,
    logit_scale: &LogitScaleModule<E, D>,
) -> Result<Tensor<(N, M), E, D, T>, Error>
where
    T: Tape<E, D> + Merge<T>,
    Error: From<D::Err>,
{
    let a = normalize(a)?;
    let b = normalize(b)?;
    let sim = a.try_matmul(b.try_permute::<(Const<K>, M), Axes2<1, 0>>()?)?;
    let scale = logit_scale
        .logit_scale
        .retaped::<T>()
        .try_exp()?
        .try_broadcast_like(sim.shape())?;
    Ok(sim.try_mul(scale)?)
}

/// Zero-shot classification: the probability of each of `K` classes for each of `N` images,
/// `softmax(logits_per_image)` over the classes, where `classes` holds the text features of
/// one caption per class (`model.forward((class_ids, images))` gives both, `class_ids` the
/// tokenized "a photo of a {class}" prompts, each ending in the end-of-text token).
pub fn zero_shot_probabilities<N: Dim, K: Dim, const PR: usize, E: Dtype, D: Device<E>, T>(
    images: Tensor<(N, Const<PR>), E, D, T>,
    classes: Tensor<(K, Const<PR>), E, D, T>,
    logit_scale: &LogitScaleModule<E, D>,
) -> Result<Tensor<(N, K), E, D, T>, Error>
where
    T: Tape<E, D> + Merge<T>,
    Error: From<D::Err>,
{
    Ok(similarity_logits(images, classes, logit_scale)?.try_softmax::<Axis<1>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_presets_count_their_parameters() {
        let dev = Cpu::default();
        let m = dev.build_module::<ClipParity, f32>();
        assert_eq!(ClipParity::PARAMS, m.num_trainable_params());
        assert_eq!(ClipParity::PARAMS, 32_789, "Hugging Face's count");
        let m = dev.build_module::<ClipTiny, f32>();
        assert_eq!(ClipTiny::PARAMS, m.num_trainable_params());
    }

    #[test]
    fn keys_are_hugging_faces() {
        let dev = Cpu::default();
        let m = dev.build_module::<ClipParity, f32>();
        let names = neural_arch::checkpoint::tensor_names(&m);
        for k in [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.1.self_attn.out_proj.bias",
            "text_model.encoder.layers.0.mlp.fc2.weight",
            "text_model.final_layer_norm.weight",
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
            "vision_model.pre_layrnorm.bias",
            "vision_model.post_layernorm.weight",
            "visual_projection.weight",
            "text_projection.weight",
            "logit_scale",
        ] {
            assert!(names.iter().any(|n| n == k), "{k} missing from {names:?}");
        }
        assert_eq!(names.len(), 78, "{names:?}");
    }

    #[test]
    fn eos_rules() {
        assert_eq!(
            EosPool::<60>::positions(&[0, 63, 60, 60, 0, 60, 1, 1], 4).unwrap(),
            [2, 1]
        );
        // The legacy rule: the first largest id.
        assert_eq!(
            EosPool::<2>::positions(&[0, 9, 4, 9, 0, 1, 2, 3], 4).unwrap(),
            [1, 3]
        );
        let e = EosPool::<60>::positions(&[0, 5, 60, 1, 0, 5, 6, 7], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sequence 1 has no end-of-text token 60"), "{e}");
        assert!(EosPool::<60>::positions(&[], 0).is_err());
    }

    #[test]
    fn heads_give_probabilities() {
        let dev = Cpu::seed_from_u64(1);
        let clip = dev.build_module::<ClipParity, f32>();
        let ids = dev.tensor([
            [0usize, 5, 9, 60, 60, 60, 60, 60],
            [0, 7, 60, 1, 1, 1, 1, 1],
            [0, 8, 8, 8, 60, 1, 1, 1],
        ]);
        let images: Tensor<Rank4<2, 3, 16, 16>, f32, _> = dev.sample_normal();
        let (text, image) = clip.forward((ids, images));
        assert_eq!(text.shape(), &(Const::<3>, Const::<16>));
        let p = zero_shot_probabilities(image.clone(), text.clone(), &clip.logit_scale).unwrap();
        assert_eq!(p.shape(), &(Const::<2>, Const::<3>));
        for row in p.array() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let per_image = similarity_logits(image.clone(), text.clone(), &clip.logit_scale)
            .unwrap()
            .array();
        let per_text = similarity_logits(text, image, &clip.logit_scale)
            .unwrap()
            .array();
        for i in 0..2 {
            for j in 0..3 {
                assert!((per_image[i][j] - per_text[j][i]).abs() < 1e-5);
            }
        }
        let e = normalize(dev.tensor([[3.0f32, 4.0]])).unwrap().array();
        assert!((e[0][0] - 0.6).abs() < 1e-6 && (e[0][1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn a_caption_without_end_of_text_is_an_error() {
        let dev = Cpu::default();
        let clip = dev.build_module::<ClipParity, f32>();
        let ids = dev.tensor([[0usize, 5, 9, 1, 1, 1, 1, 1]]);
        let images: Tensor<Rank4<1, 3, 16, 16>, f32, _> = dev.zeros();
        let e = clip.try_forward((ids, images)).unwrap_err().to_string();
        assert!(e.contains("no end-of-text token 60"), "{e}");
    }
}
