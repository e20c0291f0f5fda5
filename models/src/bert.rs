//! BERT: a bidirectional Transformer encoder, pre-trained by masked-language modelling
//! (Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
//! Understanding", <https://arxiv.org/abs/1810.04805>).
//!
//! The encoder is the original Transformer's (Vaswani et al., <https://arxiv.org/abs/1706.03762>)
//! with post-LayerNorm blocks: `h = LN(x + Attn(x))`, `y = LN(h + FFN(h))`, exact GELU, learned
//! absolute positions and two token types (segments A and B), LayerNorm `ε = 1e-12`.
//!
//! It matches Hugging Face transformers' `BertModel`, `BertForMaskedLM` and
//! `BertForSequenceClassification` (`modeling_bert.py`) tensor for tensor: every key of their
//! checkpoints (`bert.encoder.layer.0.attention.self.query.weight`, ...) is a key of the
//! models here, so `load_safetensors` reads a `save_pretrained` file directly. The masked-LM
//! decoder is tied to `word_embeddings`, as in HF, whose files leave out its duplicate
//! `cls.predictions.decoder.{weight,bias}` (ignored when present).
//!
//! ```
//! use neural_arch::prelude::*;
//! use neural_arch_models::bert::{masked_lm_loss, BertParity};
//!
//! let dev = Cpu::default();
//! let bert = dev.build_module::<BertParity, f32>();
//! let ids: Tensor<(usize, usize), usize, _> = dev.tensor_from_vec(vec![2, 7, 9, 3], (1, 4));
//! let mask: Tensor<(usize, usize), bool, _> = dev.tensor_from_vec(vec![true; 4], (1, 4));
//! let types: Tensor<(usize, usize), usize, _> = dev.zeros_like(&(1, 4));
//! let logits = bert.try_forward((ids, mask, types))?;
//! assert_eq!(logits.shape().2, Const::<64>);
//! let loss = masked_lm_loss(logits, &[-100, 7, -100, -100])?;
//! assert!(loss.array() > 0.0);
//! # Ok::<(), ModelError>(())
//! ```
//!
//! Differences from Hugging Face: no dropout on the attention probabilities
//! (`attention_probs_dropout_prob`; the hidden-state dropouts, 10 %, are here and run in
//! `forward_mut` only); no relative position embeddings, past key/values or cross-attention
//! (BERT as an encoder only); old TensorFlow-converted files with `LayerNorm.gamma`/`beta`
//! names must be renamed first.

use neural_arch::prelude::*;

// Every LayerNorm here is `LayerNorm<D, 12>`: `ε = 1e-12` (`layer_norm_eps`), not PyTorch's
// default 1e-5.

// Const parameters, in this order wherever they appear:
// - `V`: vocabulary size (`vocab_size`; 30522 for the uncased WordPiece vocabulary),
// - `P`: number of learned positions, the longest input (`max_position_embeddings`, 512),
// - `TT`: number of token types, the segments A/B (`type_vocab_size`, 2),
// - `D`: width of the hidden states (`hidden_size`, 768 for BERT-base),
// - `L`: number of encoder layers (`num_hidden_layers`, 12),
// - `H`: attention heads, dividing `D` (`num_attention_heads`, 12),
// - `F`: width of the feed-forward layer (`intermediate_size`, 3072 = 4·768),
// - `K`: number of classes of a classification head (`num_labels`).

model! {
    /// The embeddings: `LN(word[input_ids] + position[0..T] + token_type[token_type_ids])`,
    /// then dropout. HF `BertEmbeddings` (`bert.embeddings.*`).
    pub struct BertEmbeddings<const V: usize, const P: usize, const TT: usize, const D: usize> {
        /// Token ids to vectors, `[V, D]`; also the tied masked-LM decoder.
        word_embeddings: Embedding<V, D>,
        /// Learned absolute positions `0..T`, `[P, D]`.
        position_embeddings: PositionalEmbedding<P, D>,
        /// Segment A/B vectors, `[TT, D]`.
        token_type_embeddings: Embedding<TT, D>,
        #[key = "LayerNorm"]
        layer_norm: LayerNorm<D, 12>,
        dropout: Dropout<10>,
    }
    forward(input_ids: usize[B, T], token_type_ids: usize[B, T]) -> [B, T, D] {
        let words = position_embeddings(word_embeddings(input_ids));
        dropout(layer_norm(words + token_type_embeddings(token_type_ids)))
    }
}

model! {
    /// Multi-head self-attention over the tokens that `mask` keeps (`true` = attend: HF's
    /// `attention_mask`), `softmax(QKᵀ/√(D/H) + mask)·V`. HF `BertSelfAttention` (`self`).
    pub struct BertSelfAttention<const D: usize, const H: usize> {
        query: Linear<D, D>,
        key: Linear<D, D>,
        value: Linear<D, D>,
        attend: ScaledDotProductAttention<H>,
    }
    forward(x: [B, T, D], mask: bool[B, T]) -> [B, T, D] {
        attend(query(x), key(x), value(x), mask)
    }
}

model! {
    /// The attention's output projection and the post-LayerNorm residual,
    /// `LN(dropout(dense(h)) + x)`. HF `BertSelfOutput` (`attention.output`).
    pub struct BertSelfOutput<const D: usize> {
        dense: Linear<D, D>,
        #[key = "LayerNorm"]
        layer_norm: LayerNorm<D, 12>,
        dropout: Dropout<10>,
    }
    forward(h: [B, T, D], x: [B, T, D]) -> [B, T, D] {
        layer_norm(dropout(dense(h)) + x)
    }
}

model! {
    /// The attention sub-layer: self-attention, projection, residual, LayerNorm. HF
    /// `BertAttention` (`attention`).
    pub struct BertAttention<const D: usize, const H: usize> {
        #[key = "self"]
        self_attention: BertSelfAttention<D, H>,
        output: BertSelfOutput<D>,
    }
    forward(x: [B, T, D], mask: bool[B, T]) -> [B, T, D] {
        output(self_attention(x, mask), x)
    }
}

model! {
    /// The feed-forward expansion, `GELU(dense(x))` with the exact (erf) GELU. HF
    /// `BertIntermediate` (`intermediate`).
    pub struct BertIntermediate<const D: usize, const F: usize> {
        dense: Linear<D, F>,
        act: Gelu,
    }
    forward(x: [B, T, D]) -> [B, T, F];
}

model! {
    /// The feed-forward contraction and the post-LayerNorm residual,
    /// `LN(dropout(dense(h)) + x)`. HF `BertOutput` (`output`).
    pub struct BertOutput<const D: usize, const F: usize> {
        dense: Linear<F, D>,
        #[key = "LayerNorm"]
        layer_norm: LayerNorm<D, 12>,
        dropout: Dropout<10>,
    }
    forward(h: [B, T, F], x: [B, T, D]) -> [B, T, D] {
        layer_norm(dropout(dense(h)) + x)
    }
}

model! {
    /// One encoder layer (post-LN): attention, then feed-forward, each with its residual and
    /// LayerNorm. It passes the padding mask on, so that `[BertLayer; L]` runs as a chain.
    /// HF `BertLayer` (`encoder.layer.{i}`).
    pub struct BertLayer<const D: usize, const H: usize, const F: usize> {
        attention: BertAttention<D, H>,
        intermediate: BertIntermediate<D, F>,
        output: BertOutput<D, F>,
    }
    forward(x: [B, T, D], mask: bool[B, T]) -> ([B, T, D], bool[B, T]) {
        let a = attention(x, mask);
        (output(intermediate(a), a), mask)
    }
}

model! {
    /// `L` encoder layers. HF `BertEncoder` (`encoder`).
    pub struct BertEncoder<const D: usize, const L: usize, const H: usize, const F: usize> {
        layer: [BertLayer<D, H, F>; L],
    }
    forward(x: [B, T, D], mask: bool[B, T]) -> [B, T, D] {
        let (h, _) = layer(x, mask);
        h
    }
}

model! {
    /// The pooler: `tanh(dense(h[:, 0]))`, the `[CLS]` token's summary of the sequence that
    /// the classification heads read. HF `BertPooler` (`pooler`).
    pub struct BertPooler<const D: usize> {
        first: FirstToken,
        dense: Linear<D, D>,
        activation: Tanh,
    }
    forward(h: [B, T, D]) -> [B, D];
}

model! {
    /// BERT without its pooler: the hidden states `[B, T, D]` of the last layer. HF
    /// `BertModel(config, add_pooling_layer=False)`, the trunk of `BertForMaskedLM`.
    ///
    /// Inputs, in HF's order: `input_ids` `usize[B, T]`, `attention_mask` `bool[B, T]`
    /// (`true` for real tokens, `false` for padding), `token_type_ids` `usize[B, T]`.
    pub struct BertModelNoPooler<
        const V: usize,
        const P: usize,
        const TT: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
    > {
        embeddings: BertEmbeddings<V, P, TT, D>,
        encoder: BertEncoder<D, L, H, F>,
    }
    forward(input_ids: usize[B, T], attention_mask: bool[B, T], token_type_ids: usize[B, T]) -> [B, T, D] {
        encoder(embeddings(input_ids, token_type_ids), attention_mask)
    }
}

model! {
    /// BERT: embeddings, `L` post-LN encoder layers and the pooler. HF `BertModel` (keys
    /// `embeddings.*`, `encoder.*`, `pooler.*`); [`BertBase`] is `bert-base-uncased`.
    ///
    /// Returns `(hidden_states [B, T, D], pooled [B, D])`. In training, the gradient tape
    /// rides on `pooled` (the hidden states are a tape-less copy): a loss on the hidden states
    /// alone should use [`BertModelNoPooler`], whose output carries it.
    pub struct BertModel<
        const V: usize,
        const P: usize,
        const TT: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
    > {
        embeddings: BertEmbeddings<V, P, TT, D>,
        encoder: BertEncoder<D, L, H, F>,
        pooler: BertPooler<D>,
    }
    forward(input_ids: usize[B, T], attention_mask: bool[B, T], token_type_ids: usize[B, T]) -> ([B, T, D], [B, D]) {
        let h = encoder(embeddings(input_ids, token_type_ids), attention_mask);
        (h, pooler(h))
    }
}

model! {
    /// The masked-LM head's transform, `LN(GELU(dense(h)))`. HF
    /// `BertPredictionHeadTransform` (`cls.predictions.transform`).
    pub struct BertPredictionHeadTransform<const D: usize> {
        dense: Linear<D, D>,
        act: Gelu,
        #[key = "LayerNorm"]
        layer_norm: LayerNorm<D, 12>,
    }
    forward(h: [B, T, D]) -> [B, T, D];
}

model! {
    /// The transform and the decoder's own bias `[V]` (`cls.predictions.bias`); the decoder
    /// weight is `word_embeddings`, applied by [`BertForMaskedLM`] between the two. HF
    /// `BertLMPredictionHead` (`cls.predictions`).
    pub struct BertLMPredictionHead<const V: usize, const D: usize> {
        transform: BertPredictionHeadTransform<D>,
        bias: Bias<V>,
    }
    forward(h: [B, T, D]) -> [B, T, D] {
        transform(h)
    }
}

model! {
    /// The masked-LM head. HF `BertOnlyMLMHead` (`cls`).
    pub struct BertOnlyMLMHead<const V: usize, const D: usize> {
        predictions: BertLMPredictionHead<V, D>,
    }
    forward(h: [B, T, D]) -> [B, T, D];
}

model! {
    /// BERT for masked-language modelling: logits over the vocabulary at every position,
    /// `transform(h)·word_embeddingsᵀ + bias`, with the decoder tied to the input embedding.
    /// HF `BertForMaskedLM`; train it with [`masked_lm_loss`] (labels `-100` are ignored).
    ///
    /// Loads HF `BertForMaskedLM` files and also `BertForPreTraining` ones (the original
    /// `bert-base-uncased`): the pooler and next-sentence head they hold are skipped, as HF
    /// does.
    #[checkpoint(
        base = "bert.",
        ignored(
            "cls.predictions.decoder.weight",
            "cls.predictions.decoder.bias",
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "cls.seq_relationship.weight",
            "cls.seq_relationship.bias",
            "embeddings.position_ids"
        )
    )]
    pub struct BertForMaskedLM<
        const V: usize,
        const P: usize,
        const TT: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
    > {
        bert: BertModelNoPooler<V, P, TT, D, L, H, F>,
        cls: BertOnlyMLMHead<V, D>,
    }
    forward(input_ids: usize[B, T], attention_mask: bool[B, T], token_type_ids: usize[B, T]) -> [B, T, V] {
        let h = cls(bert(input_ids, attention_mask, token_type_ids));
        cls.add_bias(bert.unembed(h))
    }
}

model! {
    /// BERT for sequence classification: `classifier(dropout(pooled))`, `K` logits per
    /// sequence. HF `BertForSequenceClassification` (single-label: train it with
    /// `cross_entropy`).
    #[checkpoint(base = "bert.", ignored("embeddings.position_ids"))]
    pub struct BertForSequenceClassification<
        const V: usize,
        const P: usize,
        const TT: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
        const K: usize,
    > {
        bert: BertModel<V, P, TT, D, L, H, F>,
        dropout: Dropout<10>,
        classifier: Linear<D, K>,
    }
    forward(input_ids: usize[B, T], attention_mask: bool[B, T], token_type_ids: usize[B, T]) -> [B, K] {
        let (_, pooled) = bert(input_ids, attention_mask, token_type_ids);
        classifier(dropout(pooled))
    }
}

// The tied decoder: the masked-LM forward calls `bert.unembed(h)` and `cls.add_bias(logits)`,
// methods of the generated modules that reach the embedding and the bias inside them.

/// Vocabulary logits `[B, T, V]`.
pub type Logits<B, T, const V: usize, E, D, Tp> = Tensor<(B, T, Const<V>), E, D, Tp>;

impl<Mdl, E: Dtype, Dev: Device<E>, const V: usize, const D: usize, Em, Pos, Tt, Ln, Dr, Enc>
    BertModelNoPoolerModule<
        Mdl,
        E,
        BertEmbeddingsModule<Em, E, EmbeddingModule<V, D, E, Dev>, Pos, Tt, Ln, Dr>,
        Enc,
    >
{
    /// The tied decoder, `h · word_embeddingsᵀ`: `[B, T, D] -> [B, T, V]`.
    pub fn unembed<B: Dim, S: Dim, T: Tape<E, Dev>>(
        &self,
        h: Tensor<(B, S, Const<D>), E, Dev, T>,
    ) -> Result<Logits<B, S, V, E, Dev, T>, Dev::Err> {
        self.embeddings.word_embeddings.unembed(h)
    }
}

impl<Mdl, E: Dtype, Dev: Device<E>, const V: usize, Pm, Tr>
    BertOnlyMLMHeadModule<Mdl, E, BertLMPredictionHeadModule<Pm, E, Tr, BiasModule<V, E, Dev>>>
{
    /// Adds the decoder's bias `cls.predictions.bias` to the tied decoder's output.
    pub fn add_bias<B: Dim, S: Dim, T: Tape<E, Dev>>(
        &self,
        logits: Logits<B, S, V, E, Dev, T>,
    ) -> Result<Logits<B, S, V, E, Dev, T>, Dev::Err> {
        self.predictions.bias.try_forward(logits)
    }
}

/// HF's ignore index for masked-LM labels: positions that are not predicted.
pub const IGNORE_INDEX: i64 = -100;

/// The masked-LM loss: the mean cross-entropy over the positions whose label is not `-100`,
/// HF `BertForMaskedLM`'s `CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))`.
///
/// `labels` holds one entry per position, row-major (`B·T`): a token id in `0..V`, or `-100`
/// for a position that is not predicted (unmasked or padding). Another negative label is a
/// [`ModelError::Config`], an id `≥ V` a [`ModelError::TargetOutOfRange`]. With every position
/// ignored the loss is 0 (PyTorch gives NaN).
pub fn masked_lm_loss<const V: usize, B, S, E, D, T>(
    logits: Tensor<(B, S, Const<V>), E, D, T>,
    labels: &[i64],
) -> Result<Tensor<Rank0, E, D, T>, ModelError>
where
    B: Dim,
    S: Dim,
    E: Elem,
    D: Device<E>,
    T: Tape<E, D> + Merge<T>,
    ModelError: From<D::Err>,
{
    let mut targets = Vec::with_capacity(labels.len());
    for (position, &l) in labels.iter().enumerate() {
        targets.push(match l {
            IGNORE_INDEX => usize::MAX,
            l if l >= 0 => l as usize,
            l => {
                return Err(ModelError::Config(format!(
                    "masked_lm_loss: label {l} at position {position}; a label is a token id in \
                     0..{V}, or -100 for a position that is not predicted"
                )))
            }
        });
    }
    let opts = CrossEntropy {
        ignore_index: Some(usize::MAX),
        ..Default::default()
    };
    cross_entropy(logits, &targets, opts)
}

/// BERT-base, uncased (`bert-base-uncased` without its heads): vocabulary 30522, 512
/// positions, 2 token types, width 768, 12 layers, 12 heads, feed-forward 3072; 109.5 M
/// parameters with the pooler.
pub type BertBase = BertModel<30522, 512, 2, 768, 12, 12, 3072>;
const _: () = assert!(BertBase::PARAMS == 109_482_240);

/// BERT-base with the masked-LM head (`bert-base-uncased` as `BertForMaskedLM`): no pooler,
/// the head's transform and bias, the decoder tied.
pub type BertBaseForMaskedLM = BertForMaskedLM<30522, 512, 2, 768, 12, 12, 3072>;
const _: () = assert!(BertBaseForMaskedLM::PARAMS == 109_514_298);

/// A BERT that trains on two CPU cores in minutes, masked-LM: the 8000-token vocabulary of
/// the tiny presets, 128 positions, width 128, 4 layers, 4 heads, feed-forward 512 (1.9 M
/// parameters).
pub type BertTiny = BertForMaskedLM<8000, 128, 2, 128, 4, 4, 512>;

/// [`BertTiny`]'s trunk with a `K`-class sequence classifier.
pub type BertTinyClassifier<const K: usize> =
    BertForSequenceClassification<8000, 128, 2, 128, 4, 4, 512, K>;

/// The parity-test BERT, masked-LM (`tools/reference/arch_bert.py`): vocabulary 64, 16
/// positions, width 32, 2 layers, 2 heads, feed-forward 64.
pub type BertParity = BertForMaskedLM<64, 16, 2, 32, 2, 2, 64>;

/// [`BertParity`]'s trunk with the pooler and a 3-class classifier, for the parity test.
pub type BertParityClassifier = BertForSequenceClassification<64, 16, 2, 32, 2, 2, 64, 3>;

/// Every preset with its summary, for the `model-summary` command.
pub const PRESETS: crate::Presets = &[
    ("tiny", BertTiny::summary),
    ("tiny-classifier", BertTinyClassifier::<2>::summary),
    ("base", BertBase::summary),
    ("base-mlm", BertBaseForMaskedLM::summary),
    ("parity", BertParity::summary),
    ("parity-classifier", BertParityClassifier::summary),
];

#[cfg(test)]
mod tests {
    use super::*;

    type Ids = Tensor<(usize, usize), usize, Cpu>;
    type Mask = Tensor<(usize, usize), bool, Cpu>;

    fn batch(dev: &Cpu) -> (Ids, Mask, Ids) {
        let ids = dev.tensor_from_vec(vec![1, 5, 9, 3, 2, 7], (2, 3));
        let mask = dev.tensor_from_vec(vec![true, true, true, true, true, false], (2, 3));
        let types = dev.tensor_from_vec(vec![0, 0, 1, 0, 1, 1], (2, 3));
        (ids, mask, types)
    }

    #[test]
    fn params_const_equals_built_count() {
        let dev = Cpu::default();
        let m = dev.build_module::<BertParity, f32>();
        assert_eq!(BertParity::PARAMS, m.num_trainable_params());
        let c = dev.build_module::<BertParityClassifier, f32>();
        assert_eq!(BertParityClassifier::PARAMS, c.num_trainable_params());
        let t = dev.build_module::<BertTiny, f32>();
        assert_eq!(BertTiny::PARAMS, t.num_trainable_params());
        // The pooler, and the head's transform and bias, by hand.
        let d = 32;
        assert_eq!(
            BertParityClassifier::PARAMS + (d * d + d + 2 * d + 64),
            BertParity::PARAMS + (d * d + d) + (3 * d + 3)
        );
    }

    #[test]
    fn every_preset_summarises() {
        for (name, summary) in PRESETS {
            let s = summary();
            assert!(s.total_params > 0 && !s.rows.is_empty(), "{name}");
        }
        let s = BertBase::summary();
        assert_eq!(s.total_params, 109_482_240);
        assert!(s.to_string().contains("pooler"), "{s}");
    }

    #[test]
    fn keys_are_hugging_face_names() {
        let dev = Cpu::default();
        let m = dev.build_module::<BertParity, f32>();
        let names = neural_arch::checkpoint::tensor_names(&m);
        for k in [
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.LayerNorm.bias",
            "bert.encoder.layer.1.attention.self.query.weight",
            "bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "bert.encoder.layer.0.intermediate.dense.bias",
            "bert.encoder.layer.1.output.dense.weight",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.bias",
        ] {
            assert!(names.iter().any(|n| n == k), "{k} missing from {names:?}");
        }
        assert_eq!(m.bert.embeddings.layer_norm.eps, 1e-12);
    }

    #[test]
    fn shapes_and_the_tied_decoder() -> Result<(), ModelError> {
        let dev = Cpu::default();
        let m = dev.build_module::<BertParity, f64>();
        let (ids, mask, types) = batch(&dev);
        let logits = m.try_forward((ids.clone(), mask.clone(), types.clone()))?;
        assert_eq!(logits.shape(), &(2, 3, Const::<64>));
        let c = dev.build_module::<BertParityClassifier, f64>();
        let y = c.try_forward((ids.clone(), mask.clone(), types.clone()))?;
        assert_eq!(y.shape(), &(2, Const::<3>));
        // The decoder is word_embeddings: both uses reach its gradient.
        let grads = m.alloc_grads();
        let logits =
            m.try_forward((ids.trace(grads), mask, types.put_tape(OwnedTape::default())))?;
        let g = masked_lm_loss(logits, &[4, -100, 60, -100, 1, -100])?.backward();
        let gw = g.get(&m.bert.embeddings.word_embeddings.weight).as_vec();
        assert!(
            gw[60 * 32..61 * 32].iter().any(|v| *v != 0.0),
            "decoder row of id 60"
        );
        Ok(())
    }

    #[test]
    fn bad_labels_and_ids_are_errors() {
        let dev = Cpu::default();
        let m = dev.build_module::<BertParity, f32>();
        let (ids, mask, types) = batch(&dev);
        let logits = m.forward((ids, mask.clone(), types.clone()));
        let e = masked_lm_loss(logits, &[0, -1, 0, 0, 0, 0]).unwrap_err();
        assert!(e.to_string().contains("label -1 at position 1"), "{e}");
        let bad: Ids = dev.tensor_from_vec(vec![1, 64, 0, 0, 0, 0], (2, 3));
        assert!(m.try_forward((bad, mask, types)).is_err());
    }
}
