//! Language-model training (GPT-2, Llama) on plain text: corpus, tokenizer, batches,
//! evaluation, samples, and the `--eval-only --tokens` mode.
//!
//! Batches are random windows of `context + 1` tokens, drawn by an RNG seeded with the run's
//! seed and the step, so a resumed run sees the same batches. Evaluation is the mean
//! next-token loss over the validation text cut into consecutive windows; it is reported
//! beside the loss of the unigram model of the training text (`unigram_loss`), the baseline a
//! model that ignores context cannot beat.

use crate::bpe::Bpe;
use crate::cli::{
    apply_epochs, run_config, task_settings, train_or_evaluate, train_or_evaluate_mixed,
    CommonArgs, Defaults, DeviceChoice, InitRule,
};
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use neural_arch::amp::{HalfDevice, HalfFloat, MixedDevice, MixedTask};
use neural_arch::checkpoint::{load_safetensors, LoadOptions};
use neural_arch::dfdx::dtypes::{bf16, f16};
use neural_arch::dist::Shard;
use neural_arch::prelude::*;
use neural_arch::train::{ratios, MetricSums, Metrics, RunSummary, StepOutput, Task};
use neural_arch_models::generate::{generate, CausalLm, GenerateConfig, Sampling};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// The plays of the embedded slice (training), in the order they are concatenated.
const EMBEDDED_TRAIN: [(&str, &str); 6] = [
    ("hamlet", include_str!("../data/shakespeare/hamlet_gut.txt")),
    (
        "othello",
        include_str!("../data/shakespeare/othello_gut.txt"),
    ),
    ("lear", include_str!("../data/shakespeare/lear_gut.txt")),
    (
        "macbeth",
        include_str!("../data/shakespeare/macbeth_gut.txt"),
    ),
    (
        "romeo_and_juliet",
        include_str!("../data/shakespeare/romeo_and_juliet_gut.txt"),
    ),
    (
        "julius_caesar",
        include_str!("../data/shakespeare/julius_caesar_gut.txt"),
    ),
];
/// The held-out play of the embedded slice.
const EMBEDDED_VALID: &str = include_str!("../data/shakespeare/tempest_gut.txt");

/// Plays held out of the full Shakespeare corpus for validation.
pub const SHAKESPEARE_VALID: [&str; 2] = ["tempest_gut.txt", "midsummer_nights_dream_gut.txt"];

/// The settings of a run that a resume keeps (see [`task_settings`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct Settings {
    corpus: Corpus,
    context: usize,
    eval_tokens: usize,
    sample_tokens: usize,
}

/// Which text to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Corpus {
    /// Six plays shipped in the repository (940 KB with the held-out play); needs no set-up.
    Embedded,
    /// All of Shakespeare (`python3 tools/fetch_data.py shakespeare`).
    Shakespeare,
    /// The Brown corpus, 500 texts of 1961 American English (`python3 tools/fetch_data.py brown`).
    Brown,
}

/// Flags of the language-model trainers.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct LmArgs {
    /// The flags every trainer has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// The training text.
    #[arg(long, value_enum)]
    pub corpus: Option<Corpus>,
    /// Tokens per training sequence (at most the model's positions, for GPT-2).
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// With --eval-only: a JSON array of token ids whose mean next-token loss is computed.
    #[arg(long, requires = "eval_only")]
    pub tokens: Option<PathBuf>,
    /// Tokens of sample text printed at each evaluation.
    #[arg(long, default_value_t = 120)]
    pub sample_tokens: usize,
    /// Validation tokens per evaluation (consecutive windows from the start of the held-out
    /// text).
    #[arg(long, default_value_t = 32_768)]
    pub eval_tokens: usize,
}

/// The directory the fetch script fills: `$NEURAL_ARCH_DATA` or `~/.cache/neural-arch`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("NEURAL_ARCH_DATA") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache")
            .join("neural-arch"),
    }
}

/// The directory of a fetched data set, or an error that prints the command to fetch it.
pub fn fetched(name: &str) -> Result<PathBuf> {
    let dir = data_dir().join(name);
    if !dir.join(".sha256").exists() {
        bail!(
            "the `{name}` data set is not in {}; fetch it with\n    python3 tools/fetch_data.py {name}",
            dir.display()
        );
    }
    Ok(dir)
}

/// One Brown-corpus file as plain text: `word/tag` tokens to words, one sentence per line.
pub fn brown_to_text(raw: &str, file: &str) -> Result<String> {
    let mut out = String::new();
    for (n, line) in raw.lines().enumerate() {
        let mut words = Vec::new();
        for tok in line.split_whitespace() {
            let Some((word, tag)) = tok.rsplit_once('/') else {
                bail!(
                    "{file}, line {}: `{tok}` is not a `word/tag` token; is the Brown corpus \
                     file damaged? Fetch it again with python3 tools/fetch_data.py brown --force",
                    n + 1
                );
            };
            if word.is_empty() || tag.is_empty() {
                bail!("{file}, line {}: `{tok}` has an empty word or tag", n + 1);
            }
            words.push(word);
        }
        if !words.is_empty() {
            out.push_str(&words.join(" "));
            out.push('\n');
        }
    }
    Ok(out)
}

/// Training and validation text of a corpus.
pub fn load_corpus(corpus: Corpus) -> Result<(String, String)> {
    match corpus {
        Corpus::Embedded => Ok((
            EMBEDDED_TRAIN
                .iter()
                .map(|(_, t)| *t)
                .collect::<Vec<_>>()
                .join("\n"),
            EMBEDDED_VALID.to_string(),
        )),
        Corpus::Shakespeare => {
            let dir = fetched("shakespeare")?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "txt"))
                .collect();
            files.sort();
            let (mut train, mut valid) = (String::new(), String::new());
            for f in files {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let part = if SHAKESPEARE_VALID.contains(&name) {
                    &mut valid
                } else {
                    &mut train
                };
                part.push_str(&text);
                part.push('\n');
            }
            ensure!(
                !train.is_empty() && !valid.is_empty(),
                "{} holds no plays",
                dir.display()
            );
            Ok((train, valid))
        }
        Corpus::Brown => {
            let dir = fetched("brown")?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.len() == 4 && n.starts_with('c'))
                })
                .collect();
            files.sort();
            let (mut train, mut valid) = (String::new(), String::new());
            // Every tenth text is held out: all genres are in both parts.
            for (i, f) in files.iter().enumerate() {
                let raw = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                let text = brown_to_text(&raw, &f.display().to_string())?;
                if i % 10 == 9 { &mut valid } else { &mut train }.push_str(&text);
            }
            ensure!(
                !train.is_empty() && !valid.is_empty(),
                "{} holds no texts",
                dir.display()
            );
            Ok((train, valid))
        }
    }
}

/// Cross-entropy (nats per token) of the add-one-smoothed unigram model of `train` on `valid`.
pub fn unigram_loss(train: &[usize], valid: &[usize], vocab: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &t in train {
        counts[t] += 1.0;
    }
    let total: f64 = counts.iter().sum();
    let nll: f64 = valid.iter().map(|&t| -(counts[t] / total).ln()).sum();
    nll / valid.len().max(1) as f64
}

/// The language-modelling task of one run.
pub struct LmTask<const V: usize, D: Device<f32>> {
    /// Training token ids.
    pub train: Vec<usize>,
    /// Validation token ids.
    pub valid: Vec<usize>,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// The run's seed.
    pub seed: u64,
    /// Validation tokens per evaluation.
    pub eval_tokens: usize,
    /// The unigram baseline on the validation text.
    pub unigram: f64,
    /// The tokenizer, for samples.
    pub bpe: Bpe,
    /// Tokens of each sample.
    pub sample_tokens: usize,
    /// Where tensors are made.
    pub dev: D,
    /// This process's rows of each batch (all of them outside a `--distributed` group).
    pub shard: Shard,
}

impl<const V: usize, D: Device<f32>> std::fmt::Debug for LmTask<V, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LmTask({} train tokens, {} valid)",
            self.train.len(),
            self.valid.len()
        )
    }
}

type Ids<D, T> = Tensor<(usize, usize), usize, D, T>;
type Logits<const V: usize, D, T> = Tensor<(usize, usize, Const<V>), f32, D, T>;

impl<const V: usize, D: Device<f32>> LmTask<V, D> {
    /// Inputs and next-token targets of this process's rows of step `step`'s batch, and the
    /// number of rows.
    pub fn batch_at(&self, step: usize) -> Result<(Vec<usize>, Vec<usize>, usize), ModelError> {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ 0x4c4d_0000_0000 ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let span = self.train.len() - self.context - 1;
        let rows = self.shard.rows(self.batch)?;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        // Every rank draws the whole global batch, so that its rows are the ones one process
        // would see.
        for row in 0..self.batch {
            let at = rng.gen_range(0..=span);
            if rows.contains(&row) {
                x.extend_from_slice(&self.train[at..at + self.context]);
                y.extend_from_slice(&self.train[at + 1..at + self.context + 1]);
            }
        }
        Ok((x, y, rows.len()))
    }
}

/// Mean next-token loss of `model` over `tokens`, in windows of `context` predictions.
pub fn sequence_loss<const V: usize, D, M>(
    model: &M,
    dev: &D,
    tokens: &[usize],
    context: usize,
    batch: usize,
) -> Result<f64>
where
    D: Device<f32>,
    M: Module<Ids<D, NoneTape>, Output = Logits<V, D, NoneTape>, Error = ModelError>,
    ModelError: From<D::Err>,
{
    let (total, count) =
        sequence_loss_sum::<V, D, M>(model, dev, tokens, context, batch, Shard::SINGLE)?;
    Ok(total / count)
}

/// The summed next-token loss of `shard`'s part of [`sequence_loss`]'s windows (window `i`
/// goes to rank `i mod world`) and how many tokens it predicted: added over the ranks, the
/// sums give the loss of all of `tokens`.
pub fn sequence_loss_sum<const V: usize, D, M>(
    model: &M,
    dev: &D,
    tokens: &[usize],
    context: usize,
    batch: usize,
    shard: Shard,
) -> Result<(f64, f64)>
where
    D: Device<f32>,
    M: Module<Ids<D, NoneTape>, Output = Logits<V, D, NoneTape>, Error = ModelError>,
    ModelError: From<D::Err>,
{
    ensure!(
        tokens.len() >= 2,
        "need at least 2 tokens to compute a next-token loss, got {}",
        tokens.len()
    );
    if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t >= V) {
        bail!("token id {t} at position {i} is out of range for the model's vocabulary of {V} tokens (valid ids are 0..{V})");
    }
    // Windows of context + 1 tokens overlapping by one: every token after the first is
    // predicted once.
    let mut windows: Vec<&[usize]> = Vec::new();
    let mut start = 0;
    while start + 1 < tokens.len() {
        let end = (start + context + 1).min(tokens.len());
        windows.push(&tokens[start..end]);
        start = end - 1;
    }
    let (mut total, mut count) = (0.0f64, 0usize);
    // Windows of equal length go together; the last one may be shorter.
    let (full, rest): (Vec<&[usize]>, Vec<&[usize]>) = windows
        .iter()
        .skip(shard.rank)
        .step_by(shard.world)
        .partition(|w| w.len() == context + 1);
    for group in full.chunks(batch).chain(rest.chunks(1)) {
        let n = group[0].len() - 1;
        let x: Vec<usize> = group.iter().flat_map(|w| w[..n].iter().copied()).collect();
        let y: Vec<usize> = group.iter().flat_map(|w| w[1..].iter().copied()).collect();
        let ids = dev
            .try_tensor_from_vec(x, (group.len(), n))
            .map_err(ModelError::from)?;
        let logits = model.try_forward(ids)?;
        let loss = cross_entropy(logits, &y, Default::default())?;
        total += loss.as_vec()[0] as f64 * y.len() as f64;
        count += y.len();
    }
    Ok((total, count as f64))
}

impl<const V: usize, D, M> Task<M, f32, D> for LmTask<V, D>
where
    D: Device<f32>,
    M: ModuleMut<
            Ids<D, OwnedTape<f32, D>>,
            Output = Logits<V, D, OwnedTape<f32, D>>,
            Error = ModelError,
        > + Module<Ids<D, NoneTape>, Output = Logits<V, D, NoneTape>, Error = ModelError>
        + CausalLm<V, f32, D>,
    ModelError: From<D::Err>,
{
    fn train_step(
        &mut self,
        model: &mut M,
        step: usize,
        grads: Gradients<f32, D>,
    ) -> Result<StepOutput<f32, D>, ModelError> {
        let t = &*self;
        let (x, y, rows) = t.batch_at(step)?;
        let ids = t.dev.try_tensor_from_vec(x, (rows, t.context))?;
        let logits = model.try_forward_mut(ids.traced(grads))?;
        let loss = cross_entropy(logits, &y, Default::default())?;
        let value = loss.as_vec()[0] as f64;
        Ok(StepOutput {
            loss: value,
            grads: loss.backward(),
            items: y.len(),
        })
    }

    fn evaluate(&mut self, model: &mut M) -> Result<Metrics, ModelError> {
        let sums = self.evaluate_shard(model, Shard::SINGLE)?;
        Ok(ratios(&sums.unwrap_or_default()))
    }

    fn evaluate_shard(
        &mut self,
        model: &mut M,
        shard: Shard,
    ) -> Result<Option<MetricSums>, ModelError> {
        let t = &*self;
        let n = t.eval_tokens.min(t.valid.len());
        let (loss, tokens) =
            sequence_loss_sum::<V, D, M>(model, &t.dev, &t.valid[..n], t.context, t.batch, shard)
                .map_err(|e| ModelError::Config(format!("{e:#}")))?;
        // The unigram baseline is the same number on every rank: each weighs it once.
        Ok(Some(MetricSums::from([
            ("eval_loss".to_string(), (loss, tokens)),
            ("unigram_loss".to_string(), (t.unigram, 1.0)),
        ])))
    }

    fn samples(&mut self, model: &mut M) -> Result<Vec<String>, ModelError> {
        let t = &*self;
        let prompt: Vec<usize> = t.valid.iter().take(8).copied().collect();
        let cfg = GenerateConfig {
            max_new_tokens: t.sample_tokens,
            sampling: Sampling {
                temperature: 0.8,
                top_k: Some(40),
            },
            seed: t.seed,
            stop_token: None,
        };
        let new = generate::<V, f32, D, M>(model, &prompt, &cfg)?;
        let all: Vec<usize> = prompt.iter().chain(&new).copied().collect();
        let text = t
            .bpe
            .decode(&all)
            .map_err(|e| ModelError::Config(format!("{e:#}")))?;
        Ok(vec![
            "---- sample ----".into(),
            text,
            "----------------".into(),
        ])
    }
}

impl<const V: usize, D, W, H> MixedTask<W, D, H> for LmTask<V, D>
where
    H: HalfFloat,
    D: Device<f32> + Device<H>,
    W: ModuleMut<
        Ids<D, OwnedTape<H, D>>,
        Output = Tensor<(usize, usize, Const<V>), H, D, OwnedTape<H, D>>,
        Error = ModelError,
    >,
    ModelError: From<<D as HasErr>::Err>,
{
    fn half_loss(
        &mut self,
        model: &mut W,
        step: usize,
        grads: Gradients<H, D>,
    ) -> Result<(Tensor<Rank0, H, D, OwnedTape<H, D>>, usize), ModelError> {
        let t = &*self;
        let (x, y, rows) = t.batch_at(step)?;
        let ids = t.dev.try_tensor_from_vec(x, (rows, t.context))?;
        let logits = model.try_forward_mut(ids.traced(grads))?;
        Ok((cross_entropy(logits, &y, Default::default())?, y.len()))
    }
}

/// `--eval-only --tokens FILE`: the mean next-token loss over a given sequence.
struct TokensEval<const V: usize, D> {
    tokens: Vec<usize>,
    context: usize,
    dev: D,
}

impl<const V: usize, D, M> Task<M, f32, D> for TokensEval<V, D>
where
    D: Device<f32>,
    M: Module<Ids<D, NoneTape>, Output = Logits<V, D, NoneTape>, Error = ModelError>,
    ModelError: From<D::Err>,
{
    fn train_step(
        &mut self,
        _: &mut M,
        _: usize,
        _: Gradients<f32, D>,
    ) -> Result<StepOutput<f32, D>, ModelError> {
        Err(ModelError::Config(
            "--tokens evaluates only; it does not train".into(),
        ))
    }

    fn evaluate(&mut self, model: &mut M) -> Result<Metrics, ModelError> {
        let loss = sequence_loss::<V, D, M>(model, &self.dev, &self.tokens, self.context, 8)
            .map_err(|e| ModelError::Config(format!("{e:#}")))?;
        Ok(Metrics::from([
            ("eval_loss".to_string(), loss),
            ("eval_tokens".to_string(), self.tokens.len() as f64),
        ]))
    }
}

/// Reads a JSON array of token ids.
pub fn read_tokens(path: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let v: Vec<usize> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JSON array of non-negative integer token ids, such as [464, 3290, 318]",
            path.display()
        )
    })?;
    Ok(v)
}

/// A language model's working copy in the half type `H`, for mixed precision.
pub trait LmWork<const V: usize, D: MixedDevice<H>, H: HalfFloat>:
    TensorCollection<f32, D, To<H, D> = Self::Work>
{
    /// The working copy's type.
    type Work: TensorCollection<H, D>
        + ZeroGrads<H, D>
        + ModuleMut<
            Ids<D, OwnedTape<H, D>>,
            Output = Tensor<(usize, usize, Const<V>), H, D, OwnedTape<H, D>>,
            Error = ModelError,
        >;
}

impl<const V: usize, D: MixedDevice<H>, H: HalfFloat, M, W> LmWork<V, D, H> for M
where
    M: TensorCollection<f32, D, To<H, D> = W>,
    W: TensorCollection<H, D>
        + ZeroGrads<H, D>
        + ModuleMut<
            Ids<D, OwnedTape<H, D>>,
            Output = Tensor<(usize, usize, Const<V>), H, D, OwnedTape<H, D>>,
            Error = ModelError,
        >,
{
    type Work = W;
}

/// The bounds a language model `Built<B, f32, D>` meets for [`run`] on device `D`: training,
/// evaluation and generation in `f32`, and training in mixed precision on its `f16` or `bf16`
/// copy.
pub trait LmModel<const V: usize, D: HalfDevice>:
    LmWork<V, D, f16>
    + LmWork<V, D, bf16>
    + ZeroGrads<f32, D>
    + NumParams<f32, D>
    + ModuleMut<
        Ids<D, OwnedTape<f32, D>>,
        Output = Logits<V, D, OwnedTape<f32, D>>,
        Error = ModelError,
    > + Module<Ids<D, NoneTape>, Output = Logits<V, D, NoneTape>, Error = ModelError>
    + CausalLm<V, f32, D>
{
}

impl<const V: usize, D: HalfDevice, M> LmModel<V, D> for M where
    M: LmWork<V, D, f16>
        + LmWork<V, D, bf16>
        + ZeroGrads<f32, D>
        + NumParams<f32, D>
        + ModuleMut<
            Ids<D, OwnedTape<f32, D>>,
            Output = Logits<V, D, OwnedTape<f32, D>>,
            Error = ModelError,
        > + Module<Ids<D, NoneTape>, Output = Logits<V, D, NoneTape>, Error = ModelError>
        + CausalLm<V, f32, D>
{
}

/// Trains (or, with `--eval-only`, evaluates) the language model `B`, on the CPU or, with
/// `--device cuda` in a build with the `cuda` feature, on a GPU.
pub fn run<const V: usize, B>(
    arch: &str,
    args: &LmArgs,
    defaults: &Defaults,
    load_options: LoadOptions,
    default_corpus: Corpus,
    init: impl Fn(&str, &[usize]) -> neural_arch::init::Init + 'static,
) -> Result<RunSummary>
where
    B: BuildOnDevice<Cpu, f32> + OnCuda<V>,
    Built<B, f32, Cpu>: LmModel<V, Cpu>,
{
    let c = &args.common;
    match c.device_choice()? {
        DeviceChoice::Cpu => {
            let dev = Cpu::seed_from_u64(c.seed);
            run_on::<V, B, Cpu>(
                dev,
                arch,
                args,
                defaults,
                load_options,
                default_corpus,
                &init,
            )
        }
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => {
            B::run_cuda(n, arch, args, defaults, load_options, default_corpus, &init)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => unreachable!("device_choice refuses CUDA in a build without it"),
    }
}

/// A language model that also trains on CUDA, in a build with the `cuda` feature (a bound
/// every model meets in a build without it). A `where` clause cannot depend on a feature on
/// stable Rust; a trait can.
pub trait OnCuda<const V: usize> {
    /// [`run`] on CUDA device `ordinal`.
    #[cfg(feature = "cuda")]
    fn run_cuda(
        ordinal: usize,
        arch: &str,
        args: &LmArgs,
        defaults: &Defaults,
        load_options: LoadOptions,
        default_corpus: Corpus,
        init: &InitRule,
    ) -> Result<RunSummary>;
}

#[cfg(not(feature = "cuda"))]
impl<const V: usize, B> OnCuda<V> for B {}

#[cfg(feature = "cuda")]
impl<const V: usize, B> OnCuda<V> for B
where
    B: BuildOnDevice<Cuda, f32>,
    Built<B, f32, Cuda>: LmModel<V, Cuda>,
{
    fn run_cuda(
        ordinal: usize,
        arch: &str,
        args: &LmArgs,
        defaults: &Defaults,
        load_options: LoadOptions,
        default_corpus: Corpus,
        init: &InitRule,
    ) -> Result<RunSummary> {
        let c = &args.common;
        let dev = crate::cli::cuda_device(c, ordinal)?;
        run_on::<V, B, Cuda>(
            dev,
            arch,
            args,
            defaults,
            load_options,
            default_corpus,
            init,
        )
    }
}

fn run_on<const V: usize, B, D>(
    dev: D,
    arch: &str,
    args: &LmArgs,
    defaults: &Defaults,
    load_options: LoadOptions,
    default_corpus: Corpus,
    init: &InitRule,
) -> Result<RunSummary>
where
    D: HalfDevice + DeviceBuildExt,
    B: BuildOnDevice<D, f32>,
    Built<B, f32, D>: LmModel<V, D>,
    ModelError: From<<D as HasErr>::Err>,
{
    let c = &args.common;
    c.apply_recompute(arch, true)?;
    let mut model = dev.try_build_module::<B, f32>().map_err(ModelError::from)?;
    neural_arch::init::init_weights(&mut model, c.seed, init)?;
    if let Some(path) = &c.init_from {
        load_safetensors(&mut model, path, &load_options)
            .with_context(|| format!("cannot start from {}", path.display()))?;
    }
    if let (true, Some(tokens)) = (c.eval_only, &args.tokens) {
        let mut config = c.train_config(arch, defaults, 1)?;
        if c.out.is_none() {
            config.out = PathBuf::from("runs").join(format!("{arch}-{}-eval", c.preset));
        }
        let mut task = TokensEval::<V, D> {
            tokens: read_tokens(tokens)?,
            context: args.context,
            dev,
        };
        return Ok(c.trainer(config)?.evaluate_only(&mut task, &mut model)?);
    }
    let settings = task_settings(
        c,
        Settings {
            corpus: args.corpus.unwrap_or(default_corpus),
            context: args.context,
            eval_tokens: args.eval_tokens,
            sample_tokens: args.sample_tokens,
        },
    )?;
    let mut config = run_config(c, arch, defaults, model.num_trainable_params(), &settings)?;
    let corpus = settings.corpus;
    let (train_text, valid_text) = load_corpus(corpus)?;
    let shard = c.shard()?;
    let tok_path = config.out.join("tokenizer.json");
    // Rank 0 trains (or reloads) and saves the tokenizer; every rank uses its copy.
    let json = c.made_by_root(|| {
        std::fs::create_dir_all(&config.out)?;
        let bpe = if c.resume.is_some() && tok_path.exists() {
            Bpe::load(&tok_path)?
        } else {
            let bpe = Bpe::train(&[&train_text], V)?;
            bpe.save(&tok_path)?;
            bpe
        };
        bpe.to_json()
    })?;
    let bpe = Bpe::from_json(&json)?;
    let train = bpe.encode(&train_text)?;
    let valid = bpe.encode(&valid_text)?;
    ensure!(
        train.len() > settings.context + 1,
        "the training text has {} tokens, fewer than --context {} + 1",
        train.len(),
        settings.context
    );
    // An epoch is one pass over the training tokens, in windows of --context.
    apply_epochs(c, &mut config, train.len() / settings.context)?;
    let unigram = unigram_loss(&train, &valid, V);
    if shard.is_root() {
        println!(
            "{arch} {}: {} parameters; corpus {:?}: {} training and {} validation tokens (BPE of {} tokens); unigram baseline {unigram:.3} nats",
            c.preset, model.num_trainable_params(), corpus, train.len(), valid.len(), bpe.vocab_size()
        );
    }
    let mut task = LmTask::<V, D> {
        train,
        valid,
        batch: config.batch_size,
        context: settings.context,
        seed: config.seed,
        eval_tokens: settings.eval_tokens,
        unigram,
        bpe,
        sample_tokens: settings.sample_tokens,
        dev: dev.clone(),
        shard,
    };
    // A resumed run keeps the element type it started with.
    match config.dtype.as_str() {
        "f16" => train_or_evaluate_mixed::<f16, _, _, _>(c, config, &mut task, &mut model, 0.1),
        "bf16" => train_or_evaluate_mixed::<bf16, _, _, _>(c, config, &mut task, &mut model, 0.1),
        _ => train_or_evaluate(c, config, &mut task, &mut model, 0.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_the_batch_one_process_would_draw() -> Result<()> {
        let text = "to be or not to be, that is the question; whether 'tis nobler in the mind";
        let task = |shard| -> Result<LmTask<300, Cpu>> {
            Ok(LmTask {
                train: (0..500).map(|i| (i * 7) % 300).collect(),
                valid: vec![1, 2, 3],
                batch: 4,
                context: 8,
                seed: 3,
                eval_tokens: 3,
                unigram: 0.0,
                bpe: Bpe::train(&[text], 300)?,
                sample_tokens: 1,
                dev: Cpu::default(),
                shard,
            })
        };
        let (x, y, rows) = task(Shard::SINGLE)?.batch_at(5)?;
        assert_eq!((x.len(), y.len(), rows), (32, 32, 4));
        let (x0, y0, r0) = task(Shard { rank: 0, world: 2 })?.batch_at(5)?;
        let (x1, y1, r1) = task(Shard { rank: 1, world: 2 })?.batch_at(5)?;
        assert_eq!((r0, r1), (2, 2));
        assert_eq!([x0, x1].concat(), x);
        assert_eq!([y0, y1].concat(), y);
        assert!(task(Shard { rank: 0, world: 3 })?.batch_at(5).is_err());
        Ok(())
    }

    neural_arch::model! {
        pub struct TinyLm {
            wte: Embedding<300, 8>,
            head: Linear<8, 300>,
        }
        forward(ids: usize[B, T]) -> [B, T, 300] {
            head(wte(ids))
        }
    }

    #[test]
    fn ranks_evaluate_disjoint_windows_that_add_up_to_the_whole() -> Result<()> {
        let dev = Cpu::seed_from_u64(4);
        let model = dev.try_build_module::<TinyLm, f32>()?;
        // 10 full windows of 8 predictions and a short last one.
        let tokens: Vec<usize> = (0..86).map(|i| (i * 37 + 5) % 300).collect();
        let (whole, n) =
            sequence_loss_sum::<300, _, _>(&model, &dev, &tokens, 8, 3, Shard::SINGLE)?;
        assert_eq!(n, 85.0);
        for world in [2, 3, 4] {
            let parts: Vec<(f64, f64)> = (0..world)
                .map(|rank| {
                    sequence_loss_sum::<300, _, _>(
                        &model,
                        &dev,
                        &tokens,
                        8,
                        3,
                        Shard { rank, world },
                    )
                })
                .collect::<Result<_>>()?;
            assert!(parts.iter().all(|&(_, count)| count > 0.0), "{parts:?}");
            let (sum, count) = parts
                .iter()
                .fold((0.0, 0.0), |(s, c), &(ps, pc)| (s + ps, c + pc));
            assert_eq!(count, n, "world {world}: every token predicted once");
            // f32 batch means over other windows: equal to float rounding.
            assert!(
                (sum - whole).abs() <= 1e-6 * whole,
                "world {world}: {sum} vs {whole}"
            );
        }
        let mean = sequence_loss::<300, _, _>(&model, &dev, &tokens, 8, 3)?;
        assert!((mean - whole / n).abs() < 1e-12);
        Ok(())
    }
}
