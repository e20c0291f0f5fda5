//! Text generation shared by the language models ([`crate::gpt2`], [`crate::llama`]):
//! temperature and top-k sampling with a seeded random number generator, the per-layer
//! key/value caches, and the generation loop.
//!
//! A model takes part by implementing [`CausalLm`]: a forward pass over new tokens that reads
//! and extends a [`KvCaches`]. [`generate`] then feeds the prompt once and each sampled token
//! after it, so that every step costs one token's work instead of the whole sequence's
//! (nanoGPT's `generate` reruns the whole context; Hugging Face's `generate` with
//! `use_cache=True` does what this does).
//!
//! ```
//! use neural_arch_models::generate::{sample_next, Sampling};
//! use rand::SeedableRng;
//!
//! let mut rng = rand::rngs::StdRng::seed_from_u64(0);
//! // Temperature 0 is greedy decoding: the largest logit wins.
//! let greedy = Sampling { temperature: 0.0, top_k: None };
//! assert_eq!(sample_next(&[0.1, 2.0, -1.0], greedy, &mut rng).unwrap(), 1);
//! // Top-1 is greedy too, at any temperature.
//! let top1 = Sampling { temperature: 1.5, top_k: Some(1) };
//! assert_eq!(sample_next(&[0.1, 2.0, -1.0], top1, &mut rng).unwrap(), 1);
//! ```
#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use neural_arch::prelude::*;
use neural_arch::Error;
use rand::Rng;

/// A sequence of hidden states with runtime batch and length: `[B, S, M]`.
pub type Seq<const M: usize, E, D> = Tensor<(usize, usize, Const<M>), E, D>;

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it before the softmax: below 1 sharpens the distribution, above 1
    /// flattens it; `0` picks the most likely token (greedy decoding). Must be finite and `≥ 0`.
    pub temperature: f64,
    /// Only the `k` most likely tokens may be drawn (tokens tied with the `k`-th are kept, as in
    /// nanoGPT); `None` keeps every token. `Some(0)` is an error.
    pub top_k: Option<usize>,
}

impl Default for Sampling {
    /// Temperature 1, no top-k: the model's own distribution.
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: None,
        }
    }
}

/// What [`generate`] does: how many tokens, how they are drawn, and the seed that makes a run
/// repeatable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to generate after the prompt (fewer when `stop_token` comes first).
    pub max_new_tokens: usize,
    /// Temperature and top-k.
    pub sampling: Sampling,
    /// Seed of the random number generator (`rand`'s `StdRng`): the same seed, model and
    /// prompt give the same tokens.
    pub seed: u64,
    /// Generation ends after this token is produced (an end-of-text id), if given.
    pub stop_token: Option<usize>,
}

impl Default for GenerateConfig {
    /// 32 tokens, temperature 1, no top-k, seed 0, no stop token.
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 32,
            sampling: Sampling::default(),
            seed: 0,
            stop_token: None,
        }
    }
}

/// Draws the next token id from one position's `logits` (one value per vocabulary entry).
///
/// `p = softmax(logits / temperature)` over the `top_k` largest logits, then one draw from `p`
/// with `rng`; temperature `0` returns the index of the largest logit (the first, on ties).
/// Computed in `f64`. Errors ([`Error::Config`]): empty logits, a negative or non-finite
/// temperature, `top_k == Some(0)`, NaN logits.
///
/// PyTorch (nanoGPT): `logits / temperature`, `torch.topk` masking, `torch.multinomial(softmax)`.
pub fn sample_next<R: Rng + ?Sized>(
    logits: &[f64],
    sampling: Sampling,
    rng: &mut R,
) -> Result<usize, Error> {
    let Sampling { temperature, top_k } = sampling;
    if logits.is_empty() {
        return Err(Error::Config(
            "sample_next: no logits to sample from".into(),
        ));
    }
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::Config(format!(
            "sample_next: temperature must be finite and ≥ 0 (0 = greedy), got {temperature}"
        )));
    }
    if top_k == Some(0) {
        return Err(Error::Config(
            "sample_next: top_k must be at least 1 (or None for no limit)".into(),
        ));
    }
    if let Some(i) = logits.iter().position(|v| v.is_nan()) {
        return Err(Error::Config(format!(
            "sample_next: the logit of token {i} is NaN; the model's output is not usable"
        )));
    }
    let argmax =
        (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
    if temperature == 0.0 || top_k == Some(1) {
        return Ok(argmax);
    }
    // The k-th largest logit: everything below it is out.
    let threshold = match top_k {
        Some(k) if k < logits.len() => {
            let mut sorted = logits.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[k - 1]
        }
        _ => f64::NEG_INFINITY,
    };
    let max = logits[argmax];
    if max == f64::NEG_INFINITY {
        return Err(Error::Config(
            "sample_next: every logit is -inf; there is no token to draw".into(),
        ));
    }
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| {
            if l >= threshold {
                ((l - max) / temperature).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return Ok(i);
        }
        u -= w;
    }
    // Rounding can leave `u` a hair above the last weight: the draw is the last kept token.
    Ok(weights.iter().rposition(|&w| w > 0.0).unwrap_or(argmax))
}

/// One [`KvCache`] per attention layer of a model: the keys and values of every position fed so
/// far, for one batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCaches<E: Dtype, D: Storage<E>> {
    layers: Vec<KvCache<E, D>>,
}

impl<E: Dtype, D: Storage<E>> Default for KvCaches<E, D> {
    fn default() -> Self {
        KvCaches { layers: Vec::new() }
    }
}

impl<E: Dtype, D: Storage<E>> KvCaches<E, D> {
    /// Empty caches; a model sizes them to its number of layers on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of positions cached: the position the next token gets.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position (start a new batch of sequences).
    pub fn clear(&mut self) {
        self.layers.clear();
    }

    /// The caches of a model with `layers` attention layers: created empty on first use, an
    /// [`Error::Shape`] when they were filled by a model of another depth.
    pub fn for_layers(&mut self, layers: usize) -> Result<&mut [KvCache<E, D>], Error> {
        if self.layers.is_empty() {
            self.layers = (0..layers).map(|_| KvCache::new()).collect();
        }
        if self.layers.len() != layers {
            return Err(Error::Shape(format!(
                "these KvCaches were filled by a model with {} layers, but this model has \
                 {layers}; use one KvCaches per model, and clear() it before reusing it",
                self.layers.len()
            )));
        }
        Ok(&mut self.layers)
    }
}

/// A transformer block that can run on new tokens only, attending over the cached positions:
/// what a model's cached forward walks over. Over a sequence fed in pieces its outputs equal
/// the block's forward on the whole sequence.
pub trait CachedBlock<const M: usize, E: Dtype, D: Storage<E>> {
    /// The block's outputs `[B, S, M]` for the new positions `x`; their keys and values are
    /// appended to `cache`.
    fn try_forward_cached(
        &self,
        x: Seq<M, E, D>,
        cache: &mut KvCache<E, D>,
    ) -> Result<Seq<M, E, D>, Error>;
}

/// A causal language model that generates with a key/value cache.
pub trait CausalLm<const V: usize, E: Dtype, D: Device<E>> {
    /// The device the model's parameters live on (where the ids are put).
    fn device(&self) -> D;

    /// The logits `[B, S, V]` of the new tokens `ids` `[B, S]`, which follow the positions
    /// already in `cache`; their keys and values are appended. Over a sequence fed in pieces
    /// they equal the full forward's logits. After an error, `clear()` the cache.
    fn try_forward_cached(
        &self,
        ids: Tensor<(usize, usize), usize, D>,
        cache: &mut KvCaches<E, D>,
    ) -> Result<Tensor<(usize, usize, Const<V>), E, D>, Error>;
}

/// Continues `prompt` by up to `config.max_new_tokens` tokens and returns the new tokens only.
///
/// The prompt goes through the model once (filling the caches); then each step feeds the one
/// token just drawn and samples from the logits of the last position ([`sample_next`]), with a
/// `StdRng` seeded from `config.seed`. Errors: an empty prompt ([`Error::Config`]), an id
/// outside the vocabulary, a sequence longer than a model with learned positions holds, and
/// the errors of [`sample_next`].
pub fn generate<const V: usize, E, D, M>(
    model: &M,
    prompt: &[usize],
    config: &GenerateConfig,
) -> Result<Vec<usize>, Error>
where
    E: Elem,
    D: Device<E>,
    M: CausalLm<V, E, D>,
    Error: From<D::Err>,
{
    use rand::SeedableRng;
    if prompt.is_empty() {
        return Err(Error::Config(
            "generate: the prompt is empty; give at least one token (a start-of-text id)".into(),
        ));
    }
    let dev = model.device();
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut cache = KvCaches::new();
    let mut out = Vec::with_capacity(config.max_new_tokens);
    let mut feed = prompt.to_vec();
    while out.len() < config.max_new_tokens {
        let n = feed.len();
        let ids = dev.try_tensor_from_vec(feed, (1, n))?;
        let logits = model.try_forward_cached(ids, &mut cache)?;
        let last: Vec<f64> = logits
            .try_slice((.., n - 1..n, ..))?
            .as_vec()
            .into_iter()
            .map(|v| v.to_f64().unwrap_or(f64::NAN))
            .collect();
        let next = sample_next(&last, config.sampling, &mut rng)?;
        out.push(next);
        if config.stop_token == Some(next) {
            break;
        }
        feed = vec![next];
    }
    Ok(out)
}

/// An attention layer with a key/value cache, whatever its kind ([`CausalSelfAttention`],
/// [`GqaAttention`]): lets one block implementation serve either.
pub trait CachedAttention<const M: usize, E: Dtype, D: Storage<E>> {
    /// The layer's `try_forward_cached`.
    fn try_forward_cached(
        &self,
        x: Seq<M, E, D>,
        cache: &mut KvCache<E, D>,
    ) -> Result<Seq<M, E, D>, Error>;
}

impl<const M: usize, const H: usize, E: Elem, D: Device<E>> CachedAttention<M, E, D>
    for CausalSelfAttentionModule<M, H, E, D>
where
    Error: From<D::Err>,
{
    fn try_forward_cached(
        &self,
        x: Seq<M, E, D>,
        cache: &mut KvCache<E, D>,
    ) -> Result<Seq<M, E, D>, Error> {
        CausalSelfAttentionModule::try_forward_cached(self, x, cache)
    }
}

impl<
        const M: usize,
        const H: usize,
        const KVH: usize,
        const HD: usize,
        const THETA: usize,
        E: Elem,
        D: Device<E>,
    > CachedAttention<M, E, D> for GqaAttentionModule<M, H, KVH, HD, THETA, E, D>
where
    Error: From<D::Err>,
{
    fn try_forward_cached(
        &self,
        x: Seq<M, E, D>,
        cache: &mut KvCache<E, D>,
    ) -> Result<Seq<M, E, D>, Error> {
        GqaAttentionModule::try_forward_cached(self, x, cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(3)
    }

    #[test]
    fn top_k_only_draws_the_k_largest() {
        let logits = [0.0, 3.0, 2.9, -1.0, 2.8];
        let s = Sampling {
            temperature: 100.0,
            top_k: Some(2),
        };
        let mut r = rng();
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[sample_next(&logits, s, &mut r).unwrap()] += 1;
        }
        assert_eq!((seen[0], seen[3], seen[4]), (0, 0, 0), "{seen:?}");
        assert!(seen[1] > 100 && seen[2] > 100, "{seen:?}");
    }

    #[test]
    fn temperature_scales_the_distribution() {
        // p(1) = e / (1 + e) at temperature 1, about 0.73; at temperature 0.1, about 1.
        let logits = [0.0, 1.0];
        let mut r = rng();
        let count = |t: f64, r: &mut rand::rngs::StdRng| {
            let s = Sampling {
                temperature: t,
                top_k: None,
            };
            (0..2000)
                .filter(|_| sample_next(&logits, s, r).unwrap() == 1)
                .count()
        };
        let warm = count(1.0, &mut r) as f64 / 2000.0;
        assert!((warm - 0.731).abs() < 0.04, "{warm}");
        assert!(count(0.1, &mut r) > 1990);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample_next(&logits, Sampling::default(), &mut r).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn bad_settings_are_errors() {
        let mut r = rng();
        let bad = |t: f64, k: Option<usize>, l: &[f64], r: &mut rand::rngs::StdRng| {
            sample_next(
                l,
                Sampling {
                    temperature: t,
                    top_k: k,
                },
                r,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad(-1.0, None, &[1.0], &mut r).contains("temperature"));
        assert!(bad(f64::NAN, None, &[1.0], &mut r).contains("temperature"));
        assert!(bad(1.0, Some(0), &[1.0], &mut r).contains("top_k"));
        assert!(bad(1.0, None, &[], &mut r).contains("no logits"));
        assert!(bad(1.0, None, &[0.0, f64::NAN], &mut r).contains("token 1 is NaN"));
    }
}
