//! GPT-2 (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019,
//! <https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf>):
//! a decoder-only transformer language model with learned absolute positions, pre-norm blocks
//! (LayerNorm, causal self-attention, LayerNorm, a GELU MLP, each with a residual), a final
//! LayerNorm, and an output layer tied to the token embedding.
//!
//! It matches Hugging Face `transformers`' `GPT2LMHeadModel` (and nanoGPT's `GPT`): the same
//! tensors under the same keys (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`,
//! ...), so a `model.safetensors` from the Hub loads with [`Gpt2LMHeadModelModule::load_safetensors`]
//! and gives the same logits (`tests/parity/gpt2.rs` checks logits, loss and every gradient
//! against `transformers`). Differences in storage, handled when loading: HF's `Conv1D` keeps
//! weights as `[in, out]`, ours as `[out, in]` (PyTorch's `nn.Linear` layout); the tied
//! `lm_head.weight` is not a separate tensor here; the causal-mask buffers `attn.bias` and
//! `attn.masked_bias` of older files are skipped.
//!
//! ```
//! use neural_arch::prelude::*;
//! use neural_arch_models::generate::{GenerateConfig, Sampling};
//! use neural_arch_models::gpt2::Gpt2Parity;
//!
//! let dev = Cpu::seed_from_u64(0);
//! let gpt = dev.build_module::<Gpt2Parity, f32>();
//! // Logits for a batch of 2 sequences of 5 tokens.
//! let ids: Tensor<Rank2<2, 5>, usize, _> = dev.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]);
//! let logits = gpt.forward(ids);
//! assert_eq!(logits.shape().2, Const::<64>);
//! // Sampling 4 tokens after a prompt, with a key/value cache.
//! let config = GenerateConfig {
//!     max_new_tokens: 4,
//!     sampling: Sampling { temperature: 0.8, top_k: Some(10) },
//!     ..Default::default()
//! };
//! let new_tokens = gpt.generate(&[1, 2, 3], &config)?;
//! assert_eq!(new_tokens.len(), 4);
//! # Ok::<(), ModelError>(())
//! ```
#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use crate::generate::{
    self, CachedAttention, CachedBlock, CausalLm, GenerateConfig, KvCaches, Seq,
};
use neural_arch::prelude::*;
use neural_arch::Error;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------
//
// The model's const parameters, in the order of `Gpt2LMHeadModel<V, C, D, L, H, F>`:
// - `V`: vocabulary size (`vocab_size`; GPT-2's byte-level BPE has 50257 tokens);
// - `C`: context length, the number of learned positions (`n_positions`; 1024);
// - `D`: width of the residual stream (`n_embd`; 768 for the small model);
// - `L`: number of blocks (`n_layer`; 12);
// - `H`: attention heads, which must divide `D` (`n_head`; 12, so 64 values per head);
// - `F`: hidden width of the MLP (`n_inner`, `4·D` when unset; 3072). Stable Rust cannot
//   compute `4 * D` in a type, so it is spelled out.
//
// Fixed as in GPT-2: GELU with the tanh approximation (HF's `gelu_new`), LayerNorm
// `eps = 1e-5` (`layer_norm_epsilon`, the LayerNorm layer's default), biases everywhere, the
// output layer tied to `wte`. Dropout is left out: GPT-2 was trained with 0.1, but fine-tuning
// and the parity test use 0.

/// GPT-2 small (124M), OpenAI's `gpt2` on the Hub: 50257 tokens, 1024 positions, width 768,
/// 12 blocks of 12 heads, MLP 3072.
pub type Gpt2Small = Gpt2LMHeadModel<50257, 1024, 768, 12, 12, 3072>;
/// GPT-2 medium (355M), `gpt2-medium`.
pub type Gpt2Medium = Gpt2LMHeadModel<50257, 1024, 1024, 24, 16, 4096>;
/// A GPT-2 that trains on two CPU cores in minutes (1.85M parameters): a trainer's 8000-token
/// vocabulary, 256 positions, width 128, 4 blocks of 4 heads, MLP 512.
pub type Gpt2Tiny = Gpt2LMHeadModel<8000, 256, 128, 4, 4, 512>;
/// The configuration of the parity test (`tests/parity/gpt2.rs`): 64 tokens, 16 positions,
/// width 32, 2 blocks of 2 heads, MLP 128.
pub type Gpt2Parity = Gpt2LMHeadModel<64, 16, 32, 2, 2, 128>;

// HF `GPT2LMHeadModel.from_pretrained("gpt2").num_parameters()`: the tied head counted once.
const _: () = assert!(Gpt2Small::PARAMS == 124_439_808);
const _: () = assert!(Gpt2Medium::PARAMS == 354_823_168);

/// GPT-2's initialisation (HF `GPT2PreTrainedModel._init_weights`, nanoGPT's `_init_weights`):
/// matrices and embeddings from `N(0, 0.02²)`, biases zero, LayerNorms as built (ones and
/// zeros), and the projections into the residual stream (`c_proj`) from
/// `N(0, (0.02/√(2·layers))²)`, so that the stream's variance does not grow with depth. Use it
/// with [`neural_arch::init::init_weights`].
pub fn init_rule(layers: usize) -> impl Fn(&str, &[usize]) -> neural_arch::init::Init {
    let base = neural_arch::init::transformer_rule(0.02);
    let proj = 0.02 / (2.0 * layers as f64).sqrt();
    move |name, shape| {
        if name.ends_with("c_proj.weight") {
            neural_arch::init::Init::Normal(proj)
        } else {
            base(name, shape)
        }
    }
}

/// Every preset with its summary, for the `model-summary` command.
pub const PRESETS: &[(&str, fn() -> neural_arch::Summary)] = &[
    ("parity", Gpt2Parity::summary),
    ("tiny", Gpt2Tiny::summary),
    ("small", Gpt2Small::summary),
    ("medium", Gpt2Medium::summary),
];

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

model! {
    /// GPT-2's feed-forward block: `c_proj(gelu_tanh(c_fc(x)))`, `[*, D] -> [*, D]` through
    /// the hidden width `F`. HF: `GPT2MLP` (`c_fc`, `c_proj` are `Conv1D`s, stored transposed).
    pub struct Gpt2Mlp<const D: usize, const F: usize> {
        c_fc: Linear<D, F>,
        act: GeluTanh,
        c_proj: Linear<F, D>,
    }
}

model! {
    /// One pre-norm GPT-2 block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
    /// HF: `GPT2Block`.
    pub struct Gpt2Block<const D: usize, const H: usize, const F: usize> {
        ln_1: LayerNorm<D>,
        attn: CausalSelfAttention<D, H>,
        ln_2: LayerNorm<D>,
        mlp: Gpt2Mlp<D, F>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let x = x + attn(ln_1(x));
        x + mlp(ln_2(x))
    }
}

model! {
    /// The GPT-2 trunk: token and position embeddings, `L` blocks, the final LayerNorm;
    /// `usize[B, T] -> [B, T, D]` with `T ≤ C`. HF: `GPT2Model` (the `transformer.` of
    /// `GPT2LMHeadModel`).
    pub struct Gpt2Model<
        const V: usize,
        const C: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
    > {
        wte: Embedding<V, D>,
        wpe: PositionalEmbedding<C, D>,
        /// Recomputed in the backward pass when recomputation is on (`--recompute`).
        #[recompute]
        h: [Gpt2Block<D, H, F>; L],
        ln_f: LayerNorm<D>,
    }
    forward(ids: usize[B, T]) -> [B, T, D] {
        let x = wpe(wte(ids));
        ln_f(h(x))
    }
}

model! {
    /// GPT-2 with its language-model head: next-token logits `usize[B, T] -> [B, T, V]`, the
    /// head tied to the token embedding (`logits = h · wteᵀ`). HF: `GPT2LMHeadModel`.
    ///
    /// Checkpoint conventions: HF's `Conv1D` stores `[in, out]` where our layers store
    /// `[out, in]` (`nn.Linear`'s layout), hence `transposed`; `lm_head.weight` is `wte.weight`
    /// (tied, so not a parameter of its own here) and `attn.bias` / `attn.masked_bias` are
    /// causal-mask buffers of older files, hence `ignored`; a `GPT2Model` file (keys without
    /// `transformer.`) loads too.
    #[checkpoint(
        base = "transformer.",
        transposed("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
        ignored("lm_head.weight", "attn.bias", "attn.masked_bias")
    )]
    pub struct Gpt2LMHeadModel<
        const V: usize,
        const C: usize,
        const D: usize,
        const L: usize,
        const H: usize,
        const F: usize,
    > {
        transformer: Gpt2Model<V, C, D, L, H, F>,
    }
    forward(ids: usize[B, T]) -> [B, T, V] {
        let h = transformer(ids);
        transformer.unembed(h)
    }
}

// ---------------------------------------------------------------------------------------------
// The tied head and the cached forward (hand-written: the DSL describes the full-sequence
// forward; generation walks the same layers with a key/value cache per block).
// ---------------------------------------------------------------------------------------------

/// The built [`Gpt2Model`], with its layers' types spelled out.
type Trunk<TM, E, Dev, Blk, LnF, const V: usize, const C: usize, const D: usize, const L: usize> =
    Gpt2ModelModule<
        TM,
        E,
        EmbeddingModule<V, D, E, Dev>,
        PositionalEmbeddingModule<C, D, E, Dev>,
        Repeated<Blk, L>,
        LnF,
    >;

impl<const D: usize, BM, E, Dev, Ln1, Attn, Ln2, Mlp> CachedBlock<D, E, Dev>
    for Gpt2BlockModule<BM, E, Ln1, Attn, Ln2, Mlp>
where
    E: Elem,
    Dev: Device<E>,
    Ln1: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Ln2: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Mlp: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Attn: CachedAttention<D, E, Dev>,
    Error: From<Ln1::Error> + From<Ln2::Error> + From<Mlp::Error> + From<Dev::Err>,
{
    /// [`Gpt2Block`]'s forward with the attention reading and extending `cache`.
    fn try_forward_cached(
        &self,
        x: Seq<D, E, Dev>,
        cache: &mut KvCache<E, Dev>,
    ) -> Result<Seq<D, E, Dev>, Error> {
        let a = self
            .attn
            .try_forward_cached(self.ln_1.try_forward(x.clone())?, cache)?;
        let x = x.try_add(a)?;
        let m = self.mlp.try_forward(self.ln_2.try_forward(x.clone())?)?;
        Ok(x.try_add(m)?)
    }
}

impl<TM, E, Dev, Blk, LnF, const V: usize, const C: usize, const D: usize, const L: usize>
    Trunk<TM, E, Dev, Blk, LnF, V, C, D, L>
where
    E: Elem,
    Dev: Device<E>,
{
    /// The tied output layer: `h · wteᵀ`, `[B, S, D] -> [B, S, V]`.
    pub fn unembed<B: Dim, S: Dim, T: Tape<E, Dev>>(
        &self,
        h: Tensor<(B, S, Const<D>), E, Dev, T>,
    ) -> Result<Tensor<(B, S, Const<V>), E, Dev, T>, Dev::Err> {
        self.wte.unembed(h)
    }

    /// The trunk's outputs `[B, S, D]` for new tokens `ids` `[B, S]` at positions
    /// `cache.len()..`, attending over the cached positions; see [`CausalLm::try_forward_cached`].
    pub fn try_forward_cached(
        &self,
        ids: Tensor<(usize, usize), usize, Dev>,
        cache: &mut KvCaches<E, Dev>,
    ) -> Result<Seq<D, E, Dev>, Error>
    where
        Blk: CachedBlock<D, E, Dev>,
        LnF: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
        Error: From<LnF::Error> + From<Dev::Err>,
    {
        let (b, s) = *ids.shape();
        let past = cache.len();
        if past + s > C {
            return Err(Error::Shape(format!(
                "GPT-2 has {C} learned positions (n_positions), but generation reached position \
                 {}; keep prompt and new tokens within {C}, or drop the oldest tokens and start \
                 a new cache",
                past + s
            )));
        }
        let layers = cache.for_layers(L)?;
        // `wpe` adds rows 0..S; after a cached prefix the new tokens sit at past..past+S.
        let pos = self
            .wpe
            .weight
            .clone()
            .try_slice((past..past + s, ..))?
            .try_broadcast_like::<_, Axis<0>>(&(b, s, Const::<D>))?;
        let mut x = self.wte.try_forward(ids)?.try_add(pos)?;
        for (block, kv) in self.h.modules.iter().zip(layers.iter_mut()) {
            x = block.try_forward_cached(x, kv)?;
        }
        Ok(self.ln_f.try_forward(x)?)
    }
}

impl<M, TM, E, Dev, Blk, LnF, const V: usize, const C: usize, const D: usize, const L: usize>
    CausalLm<V, E, Dev> for Gpt2LMHeadModelModule<M, E, Trunk<TM, E, Dev, Blk, LnF, V, C, D, L>>
where
    E: Elem,
    Dev: Device<E>,
    Blk: CachedBlock<D, E, Dev>,
    LnF: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Error: From<LnF::Error> + From<Dev::Err>,
{
    fn device(&self) -> Dev {
        self.transformer.wte.weight.device().clone()
    }

    fn try_forward_cached(
        &self,
        ids: Tensor<(usize, usize), usize, Dev>,
        cache: &mut KvCaches<E, Dev>,
    ) -> Result<Tensor<(usize, usize, Const<V>), E, Dev>, Error> {
        let h = self.transformer.try_forward_cached(ids, cache)?;
        Ok(self.transformer.unembed(h)?)
    }
}

impl<M, TM, E, Dev, Blk, LnF, const V: usize, const C: usize, const D: usize, const L: usize>
    Gpt2LMHeadModelModule<M, E, Trunk<TM, E, Dev, Blk, LnF, V, C, D, L>>
where
    E: Elem,
    Dev: Device<E>,
    Blk: CachedBlock<D, E, Dev>,
    LnF: Module<Seq<D, E, Dev>, Output = Seq<D, E, Dev>>,
    Error: From<LnF::Error> + From<Dev::Err>,
{
    /// Samples up to `config.max_new_tokens` tokens after `prompt` with a key/value cache
    /// (temperature, top-k, a seeded RNG) and returns the new tokens; see
    /// [`generate::generate`]. The prompt and the new tokens together must fit in `C`
    /// positions.
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
        let m = dev.build_module::<Gpt2Parity, f32>();
        assert_eq!(Gpt2Parity::PARAMS, m.num_trainable_params());
        let m = dev.build_module::<Gpt2Tiny, f32>();
        assert_eq!(Gpt2Tiny::PARAMS, m.num_trainable_params());
        // wte, wpe, 4 blocks (2 LayerNorms, c_attn, c_proj, c_fc, c_proj), ln_f.
        let block =
            2 * 256 + (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128);
        assert_eq!(Gpt2Tiny::PARAMS, 8000 * 128 + 256 * 128 + 4 * block + 256);
        assert_eq!(Gpt2Tiny::PARAMS, 1_850_112);
    }

    #[test]
    fn keys_are_hugging_face_keys() {
        let dev = Cpu::default();
        let m = dev.build_module::<Gpt2Parity, f32>();
        let names = neural_arch::checkpoint::tensor_names(&m);
        assert_eq!(names.len(), 2 + 2 * 12 + 2);
        for k in [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.0.ln_1.weight",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.attn.c_proj.bias",
            "transformer.h.1.ln_2.bias",
            "transformer.h.1.mlp.c_fc.weight",
            "transformer.h.1.mlp.c_proj.weight",
            "transformer.ln_f.bias",
        ] {
            assert!(names.iter().any(|n| n == k), "{k} not in {names:?}");
        }
    }

    #[test]
    fn shapes_and_runtime_lengths() {
        let dev = Cpu::seed_from_u64(1);
        let m = dev.build_module::<Gpt2Parity, f32>();
        let ids: Tensor<(usize, usize), usize, _> = dev.zeros_like(&(3, 7));
        assert_eq!(m.forward(ids).shape(), &(3, 7, Const::<64>));
        // 17 positions do not fit in 16.
        let ids: Tensor<(usize, usize), usize, _> = dev.zeros_like(&(1, 17));
        let e = m.try_forward(ids).unwrap_err().to_string();
        assert!(e.contains("16 positions"), "{e}");
        // An id beyond the vocabulary.
        let ids = dev.tensor([[1usize, 64]]);
        assert!(matches!(
            m.try_forward(ids),
            Err(Error::TokenOutOfRange { id: 64, .. })
        ));
    }

    #[test]
    fn cached_logits_equal_the_full_forward() {
        let dev = Cpu::seed_from_u64(2);
        let m = dev.build_module::<Gpt2Parity, f64>();
        let seq: Vec<usize> = vec![3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7];
        let (b, t) = (1, seq.len());
        let full = m.forward(dev.tensor_from_vec(seq.clone(), (b, t))).as_vec();
        let mut cache = KvCaches::new();
        let mut got = Vec::new();
        // A prompt of 4, then single tokens, then 3 at once.
        for (a, z) in [(0, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 11)] {
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
        // The 17th position is refused, naming the limit.
        let mut cache = KvCaches::new();
        let long = dev.tensor_from_vec(vec![1; 16], (1, 16));
        CausalLm::try_forward_cached(&m, long, &mut cache).unwrap();
        let e = CausalLm::try_forward_cached(&m, dev.tensor_from_vec(vec![1], (1, 1)), &mut cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("16 learned positions"), "{e}");
    }

    #[test]
    fn generation_is_seeded_and_greedy_follows_the_argmax() {
        let dev = Cpu::seed_from_u64(3);
        let m = dev.build_module::<Gpt2Parity, f32>();
        let config = |seed, temperature| GenerateConfig {
            max_new_tokens: 6,
            sampling: generate::Sampling {
                temperature,
                top_k: Some(20),
            },
            seed,
            stop_token: None,
        };
        let a = m.generate(&[1, 2, 3], &config(5, 1.0)).unwrap();
        assert_eq!(a, m.generate(&[1, 2, 3], &config(5, 1.0)).unwrap());
        assert!(a.iter().all(|&t| t < 64));
        // Greedy decoding by hand, with the full forward each step.
        let greedy = m.generate(&[1, 2, 3], &config(0, 0.0)).unwrap();
        let mut seq = vec![1usize, 2, 3];
        for _ in 0..6 {
            let n = seq.len();
            let logits = m.forward(dev.tensor_from_vec(seq.clone(), (1, n))).as_vec();
            let last = &logits[(n - 1) * 64..];
            let best = (0..64).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            seq.push(best);
        }
        assert_eq!(greedy, seq[3..]);
        // Stop token, empty prompt, too long.
        let stop = GenerateConfig {
            stop_token: Some(greedy[1]),
            ..config(0, 0.0)
        };
        let first_stop = greedy.iter().position(|&t| t == greedy[1]).unwrap();
        assert_eq!(
            m.generate(&[1, 2, 3], &stop).unwrap(),
            greedy[..=first_stop]
        );
        assert!(m.generate(&[], &config(0, 1.0)).is_err());
        let long = GenerateConfig {
            max_new_tokens: 20,
            ..config(0, 1.0)
        };
        assert!(m.generate(&[1, 2, 3], &long).is_err());
    }

    #[test]
    fn saves_in_hugging_face_layout_and_loads_back_exactly() {
        let dir = std::env::temp_dir().join(format!("gpt2-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gpt2.safetensors");
        let dev = Cpu::seed_from_u64(4);
        let a = dev.build_module::<Gpt2Parity, f32>();
        a.save_safetensors(&path).unwrap();
        let shapes = {
            let mut b = dev.build_module::<Gpt2Parity, f32>();
            b.load_safetensors(&path).unwrap();
            assert_eq!(
                neural_arch::checkpoint::tensor_shapes(&b),
                neural_arch::checkpoint::tensor_shapes(&a)
            );
            // Square `c_proj` weights too: a transpose on one side only would go unnoticed
            // by the shape checks.
            let x = dev.tensor([[5usize, 1, 7, 2]]);
            assert_eq!(a.forward(x.clone()).as_vec(), b.forward(x).as_vec());
            let bytes = std::fs::read(&path).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            String::from_utf8(bytes[8..8 + n].to_vec()).unwrap()
        };
        // HF's Conv1D layout, [in, out].
        assert!(
            shapes
                .contains(r#""transformer.h.0.attn.c_attn.weight":{"dtype":"F32","shape":[32,96]"#),
            "{shapes}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_file_of_another_preset_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("gpt2-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("parity.safetensors");
        let dev = Cpu::default();
        dev.build_module::<Gpt2Parity, f32>()
            .save_safetensors(&path)
            .unwrap();
        let mut other = dev.build_module::<Gpt2LMHeadModel<64, 16, 32, 3, 2, 128>, f32>();
        let e = other.load_safetensors(&path).unwrap_err().to_string();
        assert!(e.contains("transformer.h.2.ln_1.weight"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}
