//! A Llama-style decoder-only transformer (Touvron et al., "LLaMA: Open and Efficient
//! Foundation Language Models", 2023, <https://arxiv.org/abs/2302.13971>; "Llama 2",
//! <https://arxiv.org/abs/2307.09288>): pre-norm blocks with RMSNorm, grouped-query attention
//! with rotary position embeddings (no learned positions), a SwiGLU feed-forward block, no
//! biases, and an untied output layer.
//!
//! It matches Hugging Face `transformers`' `LlamaForCausalLM`: the same tensors under the same
//! keys (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...,
//! `lm_head.weight`), in the same `[out, in]` layout, so a `model.safetensors` from the Hub (for
//! instance TinyLlama-1.1B, [`TinyLlama`]) loads with [`LlamaForCausalLMModule::load_safetensors`]
//! and gives the same logits once its `rms_norm_eps` is set
//! ([`LlamaForCausalLMModule::set_rms_norm_eps`]). `tests/parity/llama.rs` checks logits, loss and
//! every gradient against `transformers`. RoPE rotates the halves of each head
//! (HF's `rotate_half`), which is the layout of HF checkpoints (Meta's original files
//! interleave pairs; HF's conversion script permutes `q_proj`/`k_proj` rows to this layout).
//!
//! ```
//! use neural_arch::prelude::*;
//! use neural_arch_models::generate::{GenerateConfig, Sampling};
//! use neural_arch_models::llama::LlamaParity;
//!
//! let dev = Cpu::seed_from_u64(0);
//! let mut llama = dev.build_module::<LlamaParity, f32>();
//! llama.set_rms_norm_eps(1e-5); // the checkpoint's `rms_norm_eps`
//! let ids: Tensor<Rank2<1, 4>, usize, _> = dev.tensor([[1, 2, 3, 4]]);
//! assert_eq!(llama.forward(ids).shape().2, Const::<64>);
//! let config = GenerateConfig {
//!     max_new_tokens: 3,
//!     sampling: Sampling { temperature: 0.7, top_k: Some(5) },
//!     seed: 1,
//!     ..Default::default()
//! };
//! assert_eq!(llama.generate(&[1, 2], &config)?.len(), 3);
//! # Ok::<(), ModelError>(())
//! ```
#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use crate::generate::{
    self, CachedAttention, CachedBlock, CausalLm, GenerateConfig, KvCaches, Seq,
};
use neural_arch::layers::LinearNoBiasModule as UnbiasedLinear;
use neural_arch::prelude::*;
use neural_arch::Error;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------
//
// The model's const parameters, in the order of `LlamaForCausalLM<V, D, L, H, KVH, HD, F, THETA>`
// (Hugging Face `LlamaConfig` names; TinyLlama-1.1B's values):
// - `V`: vocabulary size (`vocab_size`; 32000, Llama 1 and 2's SentencePiece vocabulary);
// - `D`: width of the residual stream (`hidden_size`; 2048);
// - `L`: number of decoder layers (`num_hidden_layers`; 22);
// - `H`: query heads (`num_attention_heads`; 32);
// - `KVH`: key/value heads, which must divide `H` (`num_key_value_heads`; 4: grouped-query
//   attention, 8 query heads per key/value head; `KVH = H` is Llama 1's multi-head attention);
// - `HD`: width of a head, even (`head_dim`, `D / H` when unset; 64);
// - `F`: hidden width of the SwiGLU block (`intermediate_size`; 5632);
// - `THETA`: RoPE base (`rope_theta`; 10000, Llama 3 uses 500000).
//
// Fixed as in Llama: no biases (`attention_bias = mlp_bias = False`), SiLU gate
// (`hidden_act = "silu"`), untied `lm_head` (`tie_word_embeddings = False`), default RoPE (no
// scaling). `rms_norm_eps` is a runtime value of each norm: a freshly built model has the
// RMSNorm layer's default `1e-6` (Llama 1's, and HF `LlamaConfig`'s default); set the
// checkpoint's with `set_rms_norm_eps` (TinyLlama, Llama 2 and 3: [`LLAMA2_RMS_NORM_EPS`]).

/// `rms_norm_eps` of Llama 2, Llama 3 and TinyLlama checkpoints: `1e-5`.
pub const LLAMA2_RMS_NORM_EPS: f64 = 1e-5;

/// TinyLlama-1.1B (`TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T` and its chat model):
/// 32000 tokens, width 2048, 22 layers of 32 query heads sharing 4 key/value heads of width 64,
/// SwiGLU 5632, RoPE θ = 10000, untied head; `rms_norm_eps = 1e-5` ([`LLAMA2_RMS_NORM_EPS`]).
pub type TinyLlama = LlamaForCausalLM<32000, 2048, 22, 32, 4, 64, 5632, 10000>;
/// A Llama that trains on two CPU cores in minutes, with about as many parameters as
/// [`Gpt2Tiny`](crate::gpt2::Gpt2Tiny) (1.94M against 1.85M: the untied head costs a second
/// embedding table, so it is narrower): a trainer's 8000-token vocabulary, width 96, 4 layers
/// of 4 query heads sharing 2 key/value heads of width 24, SwiGLU 256 (`8/3·D`).
pub type LlamaTiny = LlamaForCausalLM<8000, 96, 4, 4, 2, 24, 256, 10000>;
/// The configuration of the parity test (`tests/parity/llama.rs`): 64 tokens, width 32,
/// 2 layers of 4 query heads sharing 2 key/value heads of width 8, SwiGLU 64.
pub type LlamaParity = LlamaForCausalLM<64, 32, 2, 4, 2, 8, 64, 10000>;

// HF `LlamaForCausalLM(TinyLlama config).num_parameters()`.
const _: () = assert!(TinyLlama::PARAMS == 1_100_048_384);

/// Llama's initialisation (HF `LlamaPreTrainedModel._init_weights`): matrices and the
/// embedding from `N(0, 0.02²)` (`initializer_range`), RMSNorm weights as built (ones). Use it
/// with [`neural_arch::init::init_weights`].
pub fn init_rule() -> impl Fn(&str, &[usize]) -> neural_arch::init::Init {
    neural_arch::init::transformer_rule(0.02)
}

/// Every preset with its summary, for the `model-summary` command.
pub const PRESETS: &[(&str, fn() -> neural_arch::Summary)] = &[
    ("parity", LlamaParity::summary),
    ("tiny", LlamaTiny::summary),
    ("tinyllama", TinyLlama::summary),
];

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

model! {
    /// One pre-norm Llama layer: `x + self_attn(input_layernorm(x))`, then
    /// `x + mlp(post_attention_layernorm(x))`. HF: `LlamaDecoderLayer`.
    pub struct LlamaDecoderLayer<
        const D: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const F: usize,
        const THETA: usize,
    > {
        input_layernorm: RMSNorm<D>,
        self_attn: GqaAttention<D, H, KVH, HD, THETA>,
        post_attention_layernorm: RMSNorm<D>,
        mlp: SwiGLU<D, F>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let x = x + self_attn(input_layernorm(x));
        x + mlp(post_attention_layernorm(x))
    }
}

model! {
    /// The Llama trunk: token embedding, `L` layers, the final RMSNorm; `usize[B, T] -> [B, T, D]`.
    /// HF: `LlamaModel` (the `model.` of `LlamaForCausalLM`).
    pub struct LlamaModel<
        const V: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const F: usize,
        const THETA: usize,
    > {
        embed_tokens: Embedding<V, D>,
        /// Recomputed in the backward pass when recomputation is on (`--recompute`).
        #[recompute]
        layers: [LlamaDecoderLayer<D, H, KVH, HD, F, THETA>; L],
        norm: RMSNorm<D>,
    }
    forward(ids: usize[B, T]) -> [B, T, D] {
        norm(layers(embed_tokens(ids)))
    }
}

model! {
    /// Llama with its language-model head: next-token logits `usize[B, T] -> [B, T, V]`.
    /// HF: `LlamaForCausalLM`. Keys without the `model.` prefix (as a `LlamaModel` saves them)
    /// are accepted for the trunk; `lm_head.weight` must be in the file.
    #[checkpoint(base = "model.")]
    pub struct LlamaForCausalLM<
        const V: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const F: usize,
        const THETA: usize,
    > {
        model: LlamaModel<V, D, L, H, KVH, HD, F, THETA>,
        lm_head: LinearNoBias<D, V>,
    }
    forward(ids: usize[B, T]) -> [B, T, V] {
        lm_head(model(ids))
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm eps and the cached forward (hand-written: the DSL describes the full-sequence
// forward; generation walks the same layers with a key/value cache per layer).
// ---------------------------------------------------------------------------------------------

/// The built [`LlamaDecoderLayer`], with its norms' type spelled out.
type Layer<LM, E, Dev, Attn, Mlp, const D: usize> =
    LlamaDecoderLayerModule<LM, E, RMSNormModule<D, E, Dev>, Attn, RMSNormModule<D, E, Dev>, Mlp>;

/// The built [`LlamaModel`], with its layers' types spelled out.
type Trunk<MM, LM, E, Dev, Attn, Mlp, const V: usize, const D: usize, const L: usize> =
    LlamaModelModule<
        MM,
        E,
        EmbeddingModule<V, D, E, Dev>,
        Repeated<Layer<LM, E, Dev, Attn, Mlp, D>, L>,
        RMSNormModule<D, E, Dev>,
    >;

/// The built [`LlamaForCausalLM`], with its layers' types spelled out.
type Lm<M, MM, LM, E, Dev, Attn, Mlp, const V: usize, const D: usize, const L: usize> =
    LlamaForCausalLMModule<
        M,
        E,
        Trunk<MM, LM, E, Dev, Attn, Mlp, V, D, L>,
        UnbiasedLinear<D, V, E, Dev>,
    >;

impl<const D: usize, LM, E, Dev, Ln1, Attn, Ln2, Mlp> CachedBlock<D, E, Dev>
    for LlamaDecoderLayerModule<LM, E, Ln1, Attn, Ln2, Mlp>
where
    E: Elem,
    Dev: Device<E>,
    Ln1: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Ln2: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Mlp: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Attn: CachedAttention<D, E, Dev>,
    Error: From<Ln1::Error> + From<Ln2::Error> + From<Mlp::Error> + From<Dev::Err>,
{
    /// [`LlamaDecoderLayer`]'s forward with the attention reading and extending `cache` (RoPE
    /// at the positions after the cached ones).
    fn try_forward_cached(
        &self,
        x: Seq<D, E, Dev>,
        cache: &mut KvCache<E, Dev>,
    ) -> Result<Seq<D, E, Dev>, Error> {
        let a = self
            .self_attn
            .try_forward_cached(self.input_layernorm.try_forward(x.clone())?, cache)?;
        let x = x.try_add(a)?;
        let m = self
            .mlp
            .try_forward(self.post_attention_layernorm.try_forward(x.clone())?)?;
        Ok(x.try_add(m)?)
    }
}

impl<M, MM, LM, E, Dev, Attn, Mlp, const V: usize, const D: usize, const L: usize>
    Lm<M, MM, LM, E, Dev, Attn, Mlp, V, D, L>
where
    E: Elem,
    Dev: Device<E>,
{
    /// Sets the `eps` of every RMSNorm (HF `rms_norm_eps`). A freshly built model has the
    /// RMSNorm layer's default ([`RMSNorm::DEFAULT_EPS`], `1e-6`), and `to_device` and
    /// `to_dtype` rebuild the norms with it: set the checkpoint's value after them.
    pub fn set_rms_norm_eps(&mut self, eps: f64) {
        for layer in &mut self.model.layers.modules {
            layer.input_layernorm.eps = eps;
            layer.post_attention_layernorm.eps = eps;
        }
        self.model.norm.eps = eps;
    }

    /// The model with every RMSNorm's `eps` set to `eps` (see [`Self::set_rms_norm_eps`]).
    pub fn with_rms_norm_eps(mut self, eps: f64) -> Self {
        self.set_rms_norm_eps(eps);
        self
    }

    /// The `eps` of the final norm (all norms share it unless set one by one).
    pub fn rms_norm_eps(&self) -> f64 {
        self.model.norm.eps
    }
}

impl<M, MM, LM, E, Dev, Attn, Mlp, const V: usize, const D: usize, const L: usize>
    CausalLm<V, E, Dev> for Lm<M, MM, LM, E, Dev, Attn, Mlp, V, D, L>
where
    E: Elem,
    Dev: Device<E>,
    Layer<LM, E, Dev, Attn, Mlp, D>: CachedBlock<D, E, Dev>,
    Error: From<Dev::Err>,
{
    fn device(&self) -> Dev {
        self.lm_head.weight.device().clone()
    }

    fn try_forward_cached(
        &self,
        ids: Tensor<(usize, usize), usize, Dev>,
        cache: &mut KvCaches<E, Dev>,
    ) -> Result<Tensor<(usize, usize, Const<V>), E, Dev>, Error> {
        let layers = cache.for_layers(L)?;
        let mut x = self.model.embed_tokens.try_forward(ids)?;
        for (layer, kv) in self.model.layers.modules.iter().zip(layers.iter_mut()) {
            x = layer.try_forward_cached(x, kv)?;
        }
        let h = self.model.norm.try_forward(x)?;
        Ok(self.lm_head.try_forward(h)?)
    }
}

impl<M, MM, LM, E, Dev, Attn, Mlp, const V: usize, const D: usize, const L: usize>
    Lm<M, MM, LM, E, Dev, Attn, Mlp, V, D, L>
where
    E: Elem,
    Dev: Device<E>,
    Layer<LM, E, Dev, Attn, Mlp, D>: CachedBlock<D, E, Dev>,
    Error: From<Dev::Err>,
{
    /// Samples up to `config.max_new_tokens` tokens after `prompt` with a key/value cache
    /// (temperature, top-k, a seeded RNG) and returns the new tokens; see
    /// [`generate::generate`]. RoPE has no position limit.
    pub fn generate(&self, prompt: &[usize], config: &GenerateConfig) -> Result<Vec<usize>, Error> {
        generate::generate(self, prompt, config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_has_a_summary() {
        for (name, summary) in PRESETS {
            let s = summary();
            assert!(s.total_params > 0, "{name}");
            assert!(!s.rows.is_empty(), "{name}");
        }
    }

    #[test]
    fn params_const_equals_built_count() {
        let dev = Cpu::default();
        let m = dev.build_module::<LlamaParity, f32>();
        assert_eq!(LlamaParity::PARAMS, m.num_trainable_params());
        let m = dev.build_module::<LlamaTiny, f32>();
        assert_eq!(LlamaTiny::PARAMS, m.num_trainable_params());
        // Embedding and head, 4 layers (q, k, v, o, SwiGLU, 2 norms), the final norm.
        let layer = 96 * 96 + 2 * 96 * 48 + 96 * 96 + 3 * 96 * 256 + 2 * 96;
        assert_eq!(LlamaTiny::PARAMS, 2 * 8000 * 96 + 4 * layer + 96);
        assert_eq!(LlamaTiny::PARAMS, 1_942_368);
        // TinyLlama by hand, the same sum.
        let layer = 2048 * 2048 * 2 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048;
        assert_eq!(TinyLlama::PARAMS, 2 * 32000 * 2048 + 22 * layer + 2048);
    }

    #[test]
    fn keys_are_hugging_face_keys_and_eps_is_settable() {
        let dev = Cpu::default();
        let mut m = dev.build_module::<LlamaParity, f32>();
        let names = neural_arch::checkpoint::tensor_names(&m);
        assert_eq!(names.len(), 1 + 2 * 9 + 1 + 1);
        for k in [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert!(names.iter().any(|n| n == k), "{k} not in {names:?}");
        }
        m.set_rms_norm_eps(1e-6);
        assert_eq!(m.rms_norm_eps(), 1e-6);
        assert_eq!(m.model.layers.modules[1].post_attention_layernorm.eps, 1e-6);
    }

    #[test]
    fn cached_logits_equal_the_full_forward() {
        let dev = Cpu::seed_from_u64(2);
        let m = dev
            .build_module::<LlamaParity, f64>()
            .with_rms_norm_eps(1e-5);
        let seq: Vec<usize> = vec![3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6];
        let t = seq.len();
        let full = m.forward(dev.tensor_from_vec(seq.clone(), (1, t))).as_vec();
        let mut cache = KvCaches::new();
        let mut got = Vec::new();
        for (a, z) in [(0, 5), (5, 6), (6, 7), (7, 10), (10, 18)] {
            let ids = dev.tensor_from_vec(seq[a..z].to_vec(), (1, z - a));
            got.extend(
                CausalLm::try_forward_cached(&m, ids, &mut cache)
                    .unwrap()
                    .as_vec(),
            );
            assert_eq!(cache.len(), z);
        }
        let worst = got
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-10, "cached vs full logits differ by {worst}");
        // A cache filled by a model of another depth is refused.
        let other = dev.build_module::<LlamaForCausalLM<64, 32, 3, 4, 2, 8, 64, 10000>, f64>();
        let e =
            CausalLm::try_forward_cached(&other, dev.tensor_from_vec(vec![1], (1, 1)), &mut cache)
                .unwrap_err()
                .to_string();
        assert!(e.contains("2 layers"), "{e}");
    }

    #[test]
    fn generation_is_seeded_and_greedy_follows_the_argmax() {
        let dev = Cpu::seed_from_u64(3);
        let m = dev.build_module::<LlamaParity, f32>();
        let config = |seed, temperature| GenerateConfig {
            max_new_tokens: 5,
            sampling: generate::Sampling {
                temperature,
                top_k: Some(8),
            },
            seed,
            stop_token: None,
        };
        let a = m.generate(&[1, 2, 3], &config(5, 1.0)).unwrap();
        assert_eq!(a, m.generate(&[1, 2, 3], &config(5, 1.0)).unwrap());
        let greedy = m.generate(&[1, 2, 3], &config(0, 0.0)).unwrap();
        let mut seq = vec![1usize, 2, 3];
        for _ in 0..5 {
            let n = seq.len();
            let logits = m.forward(dev.tensor_from_vec(seq.clone(), (1, n))).as_vec();
            let last = &logits[(n - 1) * 64..];
            let best = (0..64).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            seq.push(best);
        }
        assert_eq!(greedy, seq[3..]);
    }
}
