//! BERT training (`train-bert`): masked-LM pre-training on the Brown corpus and the
//! movie-review snippets, then sentiment fine-tuning on the snippets, evaluated on a held-out
//! split and, out of domain, on the 3,000 UCI sentences.
//!
//! Data (fetched with `python3 tools/fetch_data.py brown vader sentiment`):
//! - `vader/movieReviewSnippets_GroundTruth.txt`: 10,605 snippets of Rotten Tomatoes reviews
//!   (Pang and Lee's sentences, the source of SST), one per line as `id<TAB>rating<TAB>text`,
//!   the rating the mean of 20 human judgements on −4..4. The label is the rating's sign
//!   (snippets rated exactly 0 are left out). Snippets whose id is a multiple of 10 are held
//!   out: never trained on, neither by the classifier nor by the masked-LM.
//! - `sentiment/{imdb,yelp,amazon}.json`: Kotzias et al.'s 3,000 sentences (UCI "Sentiment
//!   Labelled Sentences"), 1,000 per site, `{"text", "class"}` with class 0 (negative) or 1.
//!   Used only for evaluation: reviews of films, restaurants and products from other sites.
//! - the Brown corpus (as [`crate::lm::load_corpus`] reads it: every tenth text held out).
//!
//! Masked-LM (`--task mlm`): the training sentences, tokenized by a WordPiece vocabulary
//! ([`crate::wordpiece`]) trained on them, are one stream; example `p` is the window of
//! `context − 2` tokens starting at the sentence `perm_e[p mod N]`, between `[CLS]` and `[SEP]`.
//! BERT's masking: 15 % of the word pieces are chosen (at least one per sequence); of those,
//! 80 % become `[MASK]`, 10 % a random piece, 10 % stay; the loss is the cross-entropy at the
//! chosen positions. The evaluation masks the held-out windows with a fixed seed and reports
//! the loss and the masked-token accuracy (top-1), with a filled-in sentence as a sample.
//!
//! Sentiment (`--task sentiment`): `[CLS] snippet [SEP]` (cut to `--context`), padded to the
//! longest in the batch and masked, into [`BertTinyClassifier`]`<2>`, cross-entropy on the
//! sign. Start it from a masked-LM run with `--init-from RUN/checkpoint/model.safetensors`:
//! the trunk is loaded, the pooler and classifier start fresh (as HF's `from_pretrained`
//! does), and the run's `tokenizer.json` is used. Evaluation: accuracy on the held-out
//! snippets (`accuracy`) and on the UCI sentences (`ood_accuracy`, and per site).
//!
//! Batches and masks are pure functions of the seed and the step, so a resumed run sees what
//! an uninterrupted one would.

use crate::argmax;
use crate::cli::{
    apply_epochs, run_config, task_settings, train_or_evaluate, train_or_evaluate_mixed,
    CommonArgs, Defaults, DeviceChoice,
};
use crate::lm::{fetched, load_corpus, Corpus};
use crate::order::{mix, EpochOrder};
use crate::wordpiece::{WordPiece, CLS, MASK, PAD, SEP};
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use neural_arch::amp::{HalfDevice, HalfFloat, MixedTask};
use neural_arch::checkpoint::load_safetensors;
use neural_arch::dfdx::dtypes::{bf16, f16};
use neural_arch::dist::Shard;
use neural_arch::prelude::*;
use neural_arch::train::{ratios, MetricSums, Metrics, RunSummary, StepOutput, Task};
use neural_arch_models::bert::{BertTiny, BertTinyClassifier, IGNORE_INDEX};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// Vocabulary of the tiny presets (and so of the WordPiece tokenizer).
pub const VOCAB: usize = 8000;
/// Positions of the tiny presets: the longest `--context`.
pub const MAX_CONTEXT: usize = 128;
/// Fraction of word pieces the masked-LM predicts.
pub const MASK_RATE: f64 = 0.15;

/// What `train-bert` trains.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BertTask {
    /// Masked-language-model pre-training on Brown and the snippets.
    Mlm,
    /// Sentiment classification of the snippets (fine-tuning).
    Sentiment,
}

/// Flags of `train-bert`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct BertArgs {
    /// The flags every trainer has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// `mlm` (pre-training) or `sentiment` (fine-tuning: start from an mlm run with
    /// --init-from RUN/checkpoint/model.safetensors).
    #[arg(long, value_enum, default_value = "mlm")]
    pub task: BertTask,
    /// Tokens per sequence, [CLS] and [SEP] included (at most 128).
    #[arg(long, default_value_t = 64)]
    pub context: usize,
    /// The tokenizer.json to use (default: the one of the --init-from run, else a new
    /// WordPiece trained on the corpus).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Held-out sequences per masked-LM evaluation.
    #[arg(long, default_value_t = 512)]
    pub eval_examples: usize,
}

/// The settings of a run that a resume keeps (see [`task_settings`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct Settings {
    task: BertTask,
    context: usize,
    eval_examples: usize,
}

/// One rated movie-review snippet.
#[derive(Debug, Clone, PartialEq)]
pub struct Snippet {
    /// The snippet's number in the file.
    pub id: usize,
    /// Mean human rating, −4 (most negative) to 4.
    pub rating: f64,
    /// The sentence.
    pub text: String,
}

impl Snippet {
    /// Held out from all training (ids that are multiples of 10).
    pub fn held_out(&self) -> bool {
        self.id.is_multiple_of(10)
    }

    /// 1 for a positive rating, 0 for a negative one, `None` for exactly 0.
    pub fn label(&self) -> Option<usize> {
        if self.rating > 0.0 {
            Some(1)
        } else if self.rating < 0.0 {
            Some(0)
        } else {
            None
        }
    }
}

const REFETCH_VADER: &str = "fetch it again with\n    python3 tools/fetch_data.py vader --force";

/// Parses `movieReviewSnippets_GroundTruth.txt` (`id<TAB>rating<TAB>text` per line); `file`
/// names it in errors.
pub fn parse_snippets(text: &str, file: &str) -> Result<Vec<Snippet>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (id, rating, body) = (parts.next(), parts.next(), parts.next());
        let parsed = match (id, rating, body) {
            (Some(id), Some(r), Some(t)) => id
                .trim()
                .parse::<usize>()
                .ok()
                .zip(r.trim().parse::<f64>().ok().filter(|r| r.abs() <= 4.0))
                .map(|(id, rating)| Snippet {
                    id,
                    rating,
                    text: t.trim().to_string(),
                }),
            _ => None,
        };
        let Some(s) = parsed else {
            let shown: String = line.chars().take(60).collect();
            bail!(
                "{file}, line {}: expected `id<TAB>rating<TAB>text` with a rating in -4..4, \
                 found `{shown}`; is the file damaged? {REFETCH_VADER}",
                n + 1
            );
        };
        out.push(s);
    }
    ensure!(!out.is_empty(), "{file} holds no snippets; {REFETCH_VADER}");
    Ok(out)
}

/// The rated snippets from the fetched `vader` data set.
pub fn load_snippets() -> Result<Vec<Snippet>> {
    let path = fetched("vader")?.join("movieReviewSnippets_GroundTruth.txt");
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read {}; {REFETCH_VADER}", path.display()))?;
    // The file is Latin-1 in places; a replacement character is better than refusing it.
    parse_snippets(
        &String::from_utf8_lossy(&bytes),
        &path.display().to_string(),
    )
}

/// One labelled sentence of the UCI set.
#[derive(Debug, Clone, PartialEq)]
pub struct Sentence {
    /// The sentence.
    pub text: String,
    /// 0 negative, 1 positive.
    pub class: usize,
}

/// The UCI sites, as the fetched files are named.
pub const UCI_SITES: [&str; 3] = ["imdb", "yelp", "amazon"];

/// Parses one UCI file (a JSON array of `{"text", "class"}`); `file` names it in errors. The
/// published files end with an empty entry (`{"text": "", "class": null}`), which is skipped.
pub fn parse_sentences(text: &str, file: &str) -> Result<Vec<Sentence>> {
    #[derive(serde::Deserialize)]
    struct Raw {
        text: String,
        class: Option<usize>,
    }
    let refetch = "fetch it again with\n    python3 tools/fetch_data.py sentiment --force";
    let v: Vec<Raw> = serde_json::from_str(text).with_context(|| {
        format!("{file} is not a JSON array of {{\"text\": .., \"class\": 0 or 1}}; {refetch}")
    })?;
    let mut out = Vec::with_capacity(v.len());
    for (i, r) in v.into_iter().enumerate() {
        match r.class {
            None if r.text.trim().is_empty() => continue,
            Some(class @ (0 | 1)) => out.push(Sentence {
                text: r.text,
                class,
            }),
            Some(c) => bail!("{file}: sentence {i} has class {c}, not 0 or 1; {refetch}"),
            None => bail!("{file}: sentence {i} has no class; {refetch}"),
        }
    }
    Ok(out)
}

/// The UCI sentences of each site, from the fetched `sentiment` data set.
pub fn load_uci() -> Result<Vec<(&'static str, Vec<Sentence>)>> {
    let dir = fetched("sentiment")?;
    UCI_SITES
        .iter()
        .map(|site| {
            let path = dir.join(format!("{site}.json"));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok((*site, parse_sentences(&text, &path.display().to_string())?))
        })
        .collect()
}

/// Masked-LM training and held-out text, one sentence per line: Brown's and the snippets'.
pub fn mlm_text() -> Result<(String, String)> {
    let (mut train, mut valid) = load_corpus(Corpus::Brown)?;
    for s in load_snippets()? {
        let part = if s.held_out() { &mut valid } else { &mut train };
        part.push_str(&s.text);
        part.push('\n');
    }
    Ok((train, valid))
}

/// BERT's masking of one sequence (`[CLS] .. [SEP]`): the inputs and the labels (`-100` where
/// nothing is predicted). Special tokens are never chosen; at least one piece is.
pub fn mask_sequence(tokens: &[usize], vocab: usize, rng: &mut StdRng) -> (Vec<usize>, Vec<i64>) {
    let mut input = tokens.to_vec();
    let mut labels = vec![IGNORE_INDEX; tokens.len()];
    let eligible: Vec<usize> = (0..tokens.len()).filter(|&i| tokens[i] > MASK).collect();
    let mut chosen: Vec<usize> = eligible
        .iter()
        .copied()
        .filter(|_| rng.gen_bool(MASK_RATE))
        .collect();
    if chosen.is_empty() {
        if let Some(&i) = eligible.choose(rng) {
            chosen.push(i);
        }
    }
    for i in chosen {
        labels[i] = tokens[i] as i64;
        let r: f64 = rng.gen();
        if r < 0.8 {
            input[i] = MASK;
        } else if r < 0.9 {
            input[i] = rng.gen_range(MASK + 1..vocab);
        }
    }
    (input, labels)
}

/// A batch of sequences padded to the longest: ids, attention mask, labels (`-100` on
/// padding), and the padded length.
struct Padded {
    ids: Vec<usize>,
    mask: Vec<bool>,
    labels: Vec<i64>,
    len: usize,
}

fn pad(seqs: &[(Vec<usize>, Vec<i64>)]) -> Padded {
    let len = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(1).max(1);
    let mut p = Padded {
        ids: Vec::with_capacity(seqs.len() * len),
        mask: Vec::with_capacity(seqs.len() * len),
        labels: Vec::with_capacity(seqs.len() * len),
        len,
    };
    for (s, l) in seqs {
        p.ids.extend(s.iter().copied());
        p.ids.extend(std::iter::repeat_n(PAD, len - s.len()));
        p.mask.extend(std::iter::repeat_n(true, s.len()));
        p.mask.extend(std::iter::repeat_n(false, len - s.len()));
        p.labels.extend(l.iter().copied());
        p.labels
            .extend(std::iter::repeat_n(IGNORE_INDEX, len - s.len()));
    }
    p
}

type Ids<D, T> = Tensor<(usize, usize), usize, D, T>;
type Mask<D> = Tensor<(usize, usize), bool, D, NoneTape>;
type Input<D, T> = (Ids<D, T>, Mask<D>, Ids<D, T>);
type ClassLogits<D, T> = Tensor<(usize, Const<2>), f32, D, T>;

fn tensors<D: Device<f32> + TensorFromVec<bool>>(
    dev: &D,
    p: &Padded,
    rows: usize,
) -> Result<Input<D, NoneTape>, ModelError>
where
    ModelError: From<D::Err>,
{
    let shape = (rows, p.len);
    Ok((
        dev.try_tensor_from_vec(p.ids.clone(), shape)?,
        dev.try_tensor_from_vec(p.mask.clone(), shape)?,
        dev.try_tensor_from_vec(vec![0usize; rows * p.len], shape)?,
    ))
}

/// A masked sequence: the token ids, and the label of each position (the original id where
/// masked, the ignore index elsewhere).
pub type MaskedSequence = (Vec<usize>, Vec<i64>);

/// The masked-LM task of one run.
pub struct MlmTask<D: Device<f32>> {
    /// The training sentences' word pieces, one stream.
    pub stream: Vec<usize>,
    /// Where each training sentence starts in the stream.
    pub starts: Vec<usize>,
    /// The held-out sequences, `[CLS] .. [SEP]`.
    pub valid: Vec<Vec<usize>>,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// The run's seed.
    pub seed: u64,
    /// The tokenizer, for samples.
    pub tokenizer: WordPiece,
    /// Where tensors are made.
    pub dev: D,
    order: EpochOrder,
    /// This process's rows of each batch (all of them outside a `--distributed` group).
    pub shard: Shard,
}

impl<D: Device<f32>> std::fmt::Debug for MlmTask<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MlmTask({} training pieces in {} sentences, {} held-out sequences)",
            self.stream.len(),
            self.starts.len(),
            self.valid.len()
        )
    }
}

/// Encodes lines into `[CLS] .. [SEP]` windows of at most `context` tokens, consecutive and
/// not overlapping: the held-out sequences.
fn windows(stream: &[usize], context: usize, limit: usize) -> Vec<Vec<usize>> {
    stream
        .chunks(context - 2)
        .take(limit)
        .map(|w| {
            let mut s = Vec::with_capacity(w.len() + 2);
            s.push(CLS);
            s.extend_from_slice(w);
            s.push(SEP);
            s
        })
        .collect()
}

/// The word pieces of each non-empty line, concatenated, with the start of each line.
pub fn encode_lines(tok: &WordPiece, text: &str) -> Result<(Vec<usize>, Vec<usize>)> {
    let (mut stream, mut starts) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let ids = tok.encode(line)?;
        if !ids.is_empty() {
            starts.push(stream.len());
            stream.extend(ids);
        }
    }
    Ok((stream, starts))
}

impl<D: Device<f32>> MlmTask<D> {
    /// A task over the training and held-out text (one sentence per line).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tokenizer: WordPiece,
        train: &str,
        valid: &str,
        batch: usize,
        context: usize,
        seed: u64,
        eval_examples: usize,
        dev: D,
    ) -> Result<Self> {
        ensure!(
            (8..=MAX_CONTEXT).contains(&context),
            "--context {context}: choose 8 to {MAX_CONTEXT} (the tiny preset's positions)"
        );
        let (stream, starts) = encode_lines(&tokenizer, train)?;
        let (valid_stream, _) = encode_lines(&tokenizer, valid)?;
        ensure!(
            !starts.is_empty() && !valid_stream.is_empty(),
            "the masked-LM needs training and held-out text; got {} training and {} held-out \
             word pieces",
            stream.len(),
            valid_stream.len()
        );
        Ok(MlmTask {
            order: EpochOrder::new(starts.len(), seed, 0x4d4c_4d00),
            stream,
            starts,
            valid: windows(&valid_stream, context, eval_examples.max(1)),
            batch,
            context,
            seed,
            tokenizer,
            dev,
            shard: Shard::SINGLE,
        })
    }

    /// The masked sequences and labels of step `step`'s batch.
    pub fn batch_at(&mut self, step: usize) -> Result<Vec<MaskedSequence>, ModelError> {
        let vocab = self.tokenizer.vocab_size();
        Ok(self
            .shard
            .rows(self.batch)?
            .map(|i| {
                let position = step * self.batch + i;
                let sentence = self.order.at(position);
                let start = self.starts[sentence];
                let end = (start + self.context - 2).min(self.stream.len());
                let mut seq = Vec::with_capacity(end - start + 2);
                seq.push(CLS);
                seq.extend_from_slice(&self.stream[start..end]);
                seq.push(SEP);
                let mut rng = StdRng::seed_from_u64(mix(self.seed, 0x4d41_534b, position as u64));
                mask_sequence(&seq, vocab, &mut rng)
            })
            .collect())
    }

    /// The held-out sequences, masked the same way at every evaluation of every run.
    fn valid_masked(&self) -> Vec<(Vec<usize>, Vec<i64>)> {
        let vocab = self.tokenizer.vocab_size();
        self.valid
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut rng = StdRng::seed_from_u64(mix(0, 0x4556_414c, i as u64));
                mask_sequence(s, vocab, &mut rng)
            })
            .collect()
    }
}

/// BERT tiny with its masked-LM head, as built on the CPU.
pub type Mlm = Built<BertTiny, f32, Cpu>;
const WIDTH: usize = 128;
type Hidden<E, D, T> = Tensor<(usize, usize, Const<WIDTH>), E, D, T>;
type MlmLogits<E, D, T> = Tensor<(usize, usize, Const<VOCAB>), E, D, T>;

/// Defines `$name`, [`head_at_labels`] for the model in element type `$e` (the model's
/// fields are only reachable on its concrete type, so one definition serves both).
macro_rules! head_at_labels_in {
    ($(#[$doc:meta])* $name:ident, $e:ty) => {
        $(#[$doc])*
        fn $name<D: Device<$e>, T: Tape<$e, D> + Merge<NoneTape>>(
            model: &Built<BertTiny, $e, D>,
            hidden: Hidden<$e, D, T>,
            labels: &[i64],
        ) -> Result<(MlmLogits<$e, D, T>, Vec<usize>), ModelError>
        where
            ModelError: From<D::Err>,
        {
            let (b, t, _) = *hidden.shape();
            let (at, targets): (Vec<usize>, Vec<usize>) = labels
                .iter()
                .enumerate()
                .filter(|(_, &l)| l != IGNORE_INDEX)
                .map(|(i, &l)| (i, l as usize))
                .unzip();
            let m = at.len();
            let dev = hidden.device().clone();
            let idx = dev.try_tensor_from_vec(at, (m,))?;
            let flat = hidden.try_reshape_like(&(b * t, Const::<WIDTH>))?;
            let picked = flat
                .try_gather(idx)?
                .try_reshape_like(&(1usize, m, Const::<WIDTH>))?;
            let h = model.cls.try_forward(picked)?;
            let logits = model.cls.add_bias(model.bert.unembed(h)?)?;
            Ok((logits, targets))
        }
    };
}

head_at_labels_in!(
    /// The vocabulary logits at the predicted positions only (labels other than `-100`), as
    /// `[1, M, V]`, with their targets. HF's `BertForMaskedLM` projects every position and
    /// ignores 85 % of them; projecting only the predicted ones gives the same loss and gradients
    /// for a sixth of the head's work.
    head_at_labels,
    f32
);
head_at_labels_in!(
    /// [`head_at_labels`] on the `f16` working copy.
    head_at_labels_f16,
    f16
);
head_at_labels_in!(
    /// [`head_at_labels`] on the `bf16` working copy.
    head_at_labels_bf16,
    bf16
);

/// `fn $name(task, model, step, grads)`: the masked-language-model loss of step `step`'s
/// batch on a model in element type `$e` (through `$head`), and how many tokens it predicts.
macro_rules! mlm_loss_in {
    ($name:ident, $e:ty, $head:ident) => {
        #[allow(clippy::type_complexity)]
        fn $name<D>(
            task: &mut MlmTask<D>,
            model: &mut Built<BertTiny, $e, D>,
            step: usize,
            grads: Gradients<$e, D>,
        ) -> Result<(Tensor<Rank0, $e, D, OwnedTape<$e, D>>, usize), ModelError>
        where
            D: Device<f32> + Device<$e> + TensorFromVec<bool>,
            ModelError: From<<D as HasErr>::Err>,
        {
            // This rank's sequences: the whole batch in one process, a shard in a group.
            let batch = task.batch_at(step)?;
            let p = pad(&batch);
            let (ids, mask, types) = tensors(&task.dev, &p, batch.len())?;
            let types = types.put_tape(OwnedTape::default());
            let hidden = model
                .bert
                .try_forward_mut((ids.traced(grads), mask, types))?;
            let (logits, targets) = $head(model, hidden, &p.labels)?;
            let loss = cross_entropy(logits, &targets, Default::default())?;
            Ok((loss, p.mask.iter().filter(|&&m| m).count()))
        }
    };
}

mlm_loss_in!(mlm_loss, f32, head_at_labels);
mlm_loss_in!(mlm_loss_f16, f16, head_at_labels_f16);
mlm_loss_in!(mlm_loss_bf16, bf16, head_at_labels_bf16);

/// The masked-language-model loss on the working copy in one half type.
macro_rules! mlm_mixed_task {
    ($e:ty, $loss:ident) => {
        impl<D> MixedTask<Built<BertTiny, $e, D>, D, $e> for MlmTask<D>
        where
            D: Device<f32> + Device<$e> + TensorFromVec<bool>,
            ModelError: From<<D as HasErr>::Err>,
        {
            fn half_loss(
                &mut self,
                model: &mut Built<BertTiny, $e, D>,
                step: usize,
                grads: Gradients<$e, D>,
            ) -> Result<(Tensor<Rank0, $e, D, OwnedTape<$e, D>>, usize), ModelError> {
                $loss(self, model, step, grads)
            }
        }
    };
}

mlm_mixed_task!(f16, mlm_loss_f16);
mlm_mixed_task!(bf16, mlm_loss_bf16);

impl<D> Task<Built<BertTiny, f32, D>, f32, D> for MlmTask<D>
where
    D: Device<f32> + TensorFromVec<bool>,
    ModelError: From<D::Err>,
{
    fn train_step(
        &mut self,
        model: &mut Built<BertTiny, f32, D>,
        step: usize,
        grads: Gradients<f32, D>,
    ) -> Result<StepOutput<f32, D>, ModelError> {
        let (loss, items) = mlm_loss(self, model, step, grads)?;
        Ok(StepOutput {
            loss: loss.as_vec()[0] as f64,
            grads: loss.try_backward()?,
            items,
        })
    }

    fn evaluate(&mut self, model: &mut Built<BertTiny, f32, D>) -> Result<Metrics, ModelError> {
        let sums = self.evaluate_shard(model, Shard::SINGLE)?;
        Ok(ratios(&sums.unwrap_or_default()))
    }

    /// The validation sequences split into `world` contiguous parts as equal as they come;
    /// every metric is a mean over their masked tokens.
    fn evaluate_shard(
        &mut self,
        model: &mut Built<BertTiny, f32, D>,
        shard: Shard,
    ) -> Result<Option<MetricSums>, ModelError> {
        let masked = self.valid_masked();
        let part = &masked[shard.part(masked.len())];
        let (mut loss_sum, mut correct, mut total) = (0.0f64, 0usize, 0usize);
        for chunk in part.chunks(self.batch.clamp(1, 64)) {
            let p = pad(chunk);
            let (ids, mask, types) = tensors(&self.dev, &p, chunk.len())?;
            let hidden = model.bert.try_forward((ids, mask, types))?;
            let (logits, targets) = head_at_labels(model, hidden, &p.labels)?;
            let rows = logits.as_vec();
            correct += rows
                .chunks_exact(VOCAB)
                .zip(&targets)
                .filter(|(row, &y)| argmax(row) == y)
                .count();
            let loss = cross_entropy(logits, &targets, Default::default())?;
            loss_sum += loss.as_vec()[0] as f64 * targets.len() as f64;
            total += targets.len();
        }
        let total = total as f64;
        Ok(Some(MetricSums::from([
            ("eval_loss".to_string(), (loss_sum, total)),
            ("masked_accuracy".to_string(), (correct as f64, total)),
        ])))
    }

    fn samples(&mut self, model: &mut Built<BertTiny, f32, D>) -> Result<Vec<String>, ModelError> {
        // One held-out sentence with its masked pieces filled in: `[guess|truth]`.
        let Some((input, labels)) = self.valid_masked().into_iter().next() else {
            return Ok(Vec::new());
        };
        let p = pad(&[(input.clone(), labels.clone())]);
        let (ids, mask, types) = tensors(&self.dev, &p, 1)?;
        let hidden = model.bert.try_forward((ids, mask, types))?;
        let (logits, _) = head_at_labels(model, hidden, &p.labels)?;
        let rows = logits.as_vec();
        let mut guesses = rows.chunks_exact(VOCAB).map(argmax);
        let tok = |i: usize| self.tokenizer.token(i).unwrap_or_else(|| "?".into());
        let mut words = Vec::new();
        for (&x, &l) in input.iter().zip(&labels) {
            if x == CLS || x == SEP {
                continue;
            }
            if l == IGNORE_INDEX {
                words.push(tok(x));
            } else {
                let guess = guesses.next().unwrap_or(0);
                words.push(format!("[{}|{}]", tok(guess), tok(l as usize)));
            }
        }
        Ok(vec![format!("masked [guess|truth]: {}", words.join(" "))])
    }
}

/// A labelled, tokenized sentence: `[CLS] .. [SEP]` and its class.
pub type Example = (Vec<usize>, usize);

/// The sentiment task of one run.
pub struct SentimentTask<D: Device<f32>> {
    /// Training snippets.
    pub train: Vec<Example>,
    /// Held-out snippets.
    pub valid: Vec<Example>,
    /// The UCI sentences of each site (out of domain).
    pub ood: Vec<(&'static str, Vec<Example>)>,
    /// Sentences per batch.
    pub batch: usize,
    /// The run's seed.
    pub seed: u64,
    /// Where tensors are made.
    pub dev: D,
    order: EpochOrder,
    /// This process's rows of each batch (all of them outside a `--distributed` group).
    pub shard: Shard,
}

impl<D: Device<f32>> std::fmt::Debug for SentimentTask<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SentimentTask({} train, {} held out, {} out of domain)",
            self.train.len(),
            self.valid.len(),
            self.ood.iter().map(|(_, v)| v.len()).sum::<usize>()
        )
    }
}

/// `[CLS] pieces [SEP]`, the pieces cut to fit `context`.
pub fn classify_input(tok: &WordPiece, text: &str, context: usize) -> Result<Vec<usize>> {
    let mut ids = tok.encode(text)?;
    ids.truncate(context - 2);
    let mut s = Vec::with_capacity(ids.len() + 2);
    s.push(CLS);
    s.extend(ids);
    s.push(SEP);
    Ok(s)
}

impl<D: Device<f32>> SentimentTask<D> {
    /// The task: snippets split by [`Snippet::held_out`], UCI sentences for evaluation only.
    pub fn new(
        tok: &WordPiece,
        snippets: &[Snippet],
        uci: &[(&'static str, Vec<Sentence>)],
        context: usize,
        batch: usize,
        seed: u64,
        dev: D,
    ) -> Result<Self> {
        ensure!(
            (4..=MAX_CONTEXT).contains(&context),
            "--context {context}: choose 4 to {MAX_CONTEXT} (the tiny preset's positions)"
        );
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for s in snippets {
            if let Some(label) = s.label() {
                let x = classify_input(tok, &s.text, context)?;
                if s.held_out() { &mut valid } else { &mut train }.push((x, label));
            }
        }
        ensure!(
            !train.is_empty() && !valid.is_empty(),
            "no rated snippets to train on or to hold out ({} and {})",
            train.len(),
            valid.len()
        );
        let ood = uci
            .iter()
            .map(|(site, v)| {
                let ex = v
                    .iter()
                    .map(|s| Ok((classify_input(tok, &s.text, context)?, s.class)))
                    .collect::<Result<Vec<_>>>()?;
                Ok((*site, ex))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SentimentTask {
            order: EpochOrder::new(train.len(), seed, 0x5345_4e54),
            train,
            valid,
            ood,
            batch,
            seed,
            dev,
            shard: Shard::SINGLE,
        })
    }

    /// The sentences and labels of step `step`'s batch.
    pub fn batch_at(&mut self, step: usize) -> Result<Vec<Example>, ModelError> {
        Ok(self
            .shard
            .rows(self.batch)?
            .map(|i| {
                let position = step * self.batch + i;
                let idx = self.order.at(position);
                self.train[idx].clone()
            })
            .collect())
    }
}

fn as_padded(examples: &[Example]) -> (Padded, Vec<usize>) {
    let seqs: Vec<(Vec<usize>, Vec<i64>)> = examples
        .iter()
        .map(|(s, _)| (s.clone(), vec![IGNORE_INDEX; s.len()]))
        .collect();
    (pad(&seqs), examples.iter().map(|(_, y)| *y).collect())
}

/// The correct answers, the summed loss and the number of `examples`, for `model`.
fn classify<D, M>(model: &M, dev: &D, examples: &[Example]) -> Result<[f64; 3], ModelError>
where
    D: Device<f32> + TensorFromVec<bool>,
    M: Module<Input<D, NoneTape>, Output = ClassLogits<D, NoneTape>, Error = ModelError>,
    ModelError: From<D::Err>,
{
    let (mut correct, mut loss_sum) = (0usize, 0.0f64);
    for chunk in examples.chunks(64) {
        let (p, y) = as_padded(chunk);
        let (ids, mask, types) = tensors(dev, &p, chunk.len())?;
        let logits = model.try_forward((ids, mask, types))?;
        let rows = logits.as_vec();
        correct += rows
            .chunks_exact(2)
            .zip(&y)
            .filter(|(r, &l)| argmax(r) == l)
            .count();
        loss_sum +=
            cross_entropy(logits, &y, Default::default())?.as_vec()[0] as f64 * chunk.len() as f64;
    }
    Ok([correct as f64, loss_sum, examples.len() as f64])
}

impl<D, W, H> MixedTask<W, D, H> for SentimentTask<D>
where
    H: HalfFloat,
    D: Device<f32> + Device<H> + TensorFromVec<bool>,
    W: ModuleMut<
        Input<D, OwnedTape<H, D>>,
        Output = Tensor<(usize, Const<2>), H, D, OwnedTape<H, D>>,
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
        let batch = self.batch_at(step)?;
        let (p, y) = as_padded(&batch);
        let (ids, mask, types) = tensors(&self.dev, &p, batch.len())?;
        let types = types.put_tape(OwnedTape::default());
        let logits = model.try_forward_mut((ids.traced(grads), mask, types))?;
        let loss = cross_entropy(logits, &y, Default::default())?;
        Ok((loss, p.mask.iter().filter(|&&m| m).count()))
    }
}

impl<D, M> Task<M, f32, D> for SentimentTask<D>
where
    D: Device<f32> + TensorFromVec<bool>,
    M: ModuleMut<
            Input<D, OwnedTape<f32, D>>,
            Output = ClassLogits<D, OwnedTape<f32, D>>,
            Error = ModelError,
        > + Module<Input<D, NoneTape>, Output = ClassLogits<D, NoneTape>, Error = ModelError>,
    ModelError: From<D::Err>,
{
    fn train_step(
        &mut self,
        model: &mut M,
        step: usize,
        grads: Gradients<f32, D>,
    ) -> Result<StepOutput<f32, D>, ModelError> {
        let batch = self.batch_at(step)?;
        let (p, y) = as_padded(&batch);
        let (ids, mask, types) = tensors(&self.dev, &p, batch.len())?;
        let types = types.put_tape(OwnedTape::default());
        let logits = model.try_forward_mut((ids.traced(grads), mask, types))?;
        let loss = cross_entropy(logits, &y, Default::default())?;
        Ok(StepOutput {
            loss: loss.as_vec()[0] as f64,
            grads: loss.backward(),
            items: p.mask.iter().filter(|&&m| m).count(),
        })
    }

    fn evaluate(&mut self, model: &mut M) -> Result<Metrics, ModelError> {
        let sums = self.evaluate_shard(model, Shard::SINGLE)?;
        Ok(ratios(&sums.unwrap_or_default()))
    }

    /// The held-out snippets and each site's sentences split into `world` contiguous parts as
    /// equal as they come; every metric is a mean over sentences (`ood_accuracy` over all the
    /// sites' together).
    fn evaluate_shard(
        &mut self,
        model: &mut M,
        shard: Shard,
    ) -> Result<Option<MetricSums>, ModelError> {
        let valid = &self.valid[shard.part(self.valid.len())];
        let [correct, loss_sum, n] = classify(model, &self.dev, valid)?;
        let mut sums = MetricSums::from([
            ("eval_loss".to_string(), (loss_sum, n)),
            ("accuracy".to_string(), (correct, n)),
        ]);
        let (mut ood_correct, mut ood_n) = (0.0, 0.0);
        for (site, ex) in &self.ood {
            let [correct, _, n] = classify(model, &self.dev, &ex[shard.part(ex.len())])?;
            sums.insert(format!("ood_accuracy_{site}"), (correct, n));
            (ood_correct, ood_n) = (ood_correct + correct, ood_n + n);
        }
        if !self.ood.is_empty() {
            sums.insert("ood_accuracy".to_string(), (ood_correct, ood_n));
        }
        Ok(Some(sums))
    }
}

/// The tokenizer of a run: the resumed run's own, `--tokenizer`, the one of the `--init-from`
/// run (sentiment), or a new one trained on the masked-LM text. Written to `out`.
fn tokenizer(args: &BertArgs, out: &Path) -> Result<WordPiece> {
    let own = out.join("tokenizer.json");
    let path = if args.common.resume.is_some() {
        ensure!(
            own.exists(),
            "{} is missing: the run to resume has no tokenizer",
            own.display()
        );
        Some(own.clone())
    } else if let Some(t) = &args.tokenizer {
        Some(t.clone())
    } else if let (BertTask::Sentiment, Some(init)) = (args.task, &args.common.init_from) {
        // RUN/checkpoint/model.safetensors: the run's tokenizer is RUN/tokenizer.json.
        let found = init
            .ancestors()
            .skip(1)
            .take(2)
            .map(|d| d.join("tokenizer.json"))
            .find(|p| p.exists());
        match found {
            Some(p) => Some(p),
            None => bail!(
                "no tokenizer.json beside {} or in its parent directory; the weights need the \
                 tokenizer they were trained with: pass it with --tokenizer FILE",
                init.display()
            ),
        }
    } else {
        None
    };
    let tok = match path {
        Some(p) => WordPiece::load(&p)?,
        None => {
            let (train, _) = mlm_text()?;
            WordPiece::train(&[&train], VOCAB)?
        }
    };
    tok.check(VOCAB)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    if !own.exists() || args.common.resume.is_none() {
        tok.save(&own)?;
    }
    Ok(tok)
}

/// Trains (or, with `--eval-only`, evaluates) BERT tiny on the chosen task, on the CPU or, with
/// `--device cuda` in a build with the `cuda` feature, on a GPU.
pub fn run(args: &BertArgs, mlm: &Defaults, sentiment: &Defaults) -> Result<RunSummary> {
    let c = &args.common;
    match c.device_choice()? {
        DeviceChoice::Cpu => run_on(Cpu::seed_from_u64(c.seed), args, mlm, sentiment),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => run_on(crate::cli::cuda_device(c, n)?, args, mlm, sentiment),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => unreachable!("device_choice refuses CUDA in a build without it"),
    }
}

/// Trains in the run's element type (a resumed run keeps the one it started with).
fn train_in_dtype<M, T, D>(
    c: &CommonArgs,
    config: neural_arch::train::TrainConfig,
    task: &mut T,
    model: &mut M,
) -> Result<RunSummary>
where
    D: HalfDevice,
    M: TensorCollection<f32, D> + ZeroGrads<f32, D> + NumParams<f32, D>,
    M::To<f16, D>: TensorCollection<f16, D> + ZeroGrads<f16, D>,
    M::To<bf16, D>: TensorCollection<bf16, D> + ZeroGrads<bf16, D>,
    T: Task<M, f32, D> + MixedTask<M::To<f16, D>, D, f16> + MixedTask<M::To<bf16, D>, D, bf16>,
    ModelError: From<<D as HasErr>::Err>,
{
    match config.dtype.as_str() {
        "f16" => train_or_evaluate_mixed::<f16, _, _, _>(c, config, task, model, 0.01),
        "bf16" => train_or_evaluate_mixed::<bf16, _, _, _>(c, config, task, model, 0.01),
        _ => train_or_evaluate(c, config, task, model, 0.01),
    }
}

fn run_on<D>(dev: D, args: &BertArgs, mlm: &Defaults, sentiment: &Defaults) -> Result<RunSummary>
where
    D: HalfDevice + DeviceBuildExt + TensorFromVec<bool>,
    ModelError: From<<D as HasErr>::Err>,
{
    let c = &args.common;
    c.apply_recompute("bert", false)?;
    ensure!(
        c.preset == "tiny",
        "unknown preset `{}` for bert; choose tiny (bert-base takes days on a CPU)",
        c.preset
    );
    let rule = neural_arch::init::transformer_rule(0.02);
    let settings = task_settings(
        c,
        Settings {
            task: args.task,
            context: args.context,
            eval_examples: args.eval_examples,
        },
    )?;
    match settings.task {
        BertTask::Mlm => {
            let mut model = dev
                .try_build_module::<BertTiny, f32>()
                .map_err(ModelError::from)?;
            neural_arch::init::init_weights(&mut model, c.seed, &rule)?;
            let mut config =
                run_config(c, "bert-mlm", mlm, model.num_trainable_params(), &settings)?;
            let tok =
                WordPiece::from_json(&c.made_by_root(|| tokenizer(args, &config.out)?.to_json())?)?;
            if let Some(path) = &c.init_from {
                load_safetensors(&mut model, path, &<Built<BertTiny, f32, D>>::load_options())
                    .with_context(|| format!("cannot start from {}", path.display()))?;
            }
            let (train, valid) = mlm_text()?;
            let mut task = MlmTask::new(
                tok,
                &train,
                &valid,
                config.batch_size,
                settings.context,
                config.seed,
                settings.eval_examples,
                dev.clone(),
            )?;
            task.shard = c.shard()?;
            apply_epochs(c, &mut config, task.starts.len())?;
            if task.shard.is_root() {
                println!(
                    "bert-mlm tiny: {} parameters; {} training sentences ({} word pieces), {} \
                     held-out sequences of up to {} tokens",
                    model.num_trainable_params(),
                    task.starts.len(),
                    task.stream.len(),
                    task.valid.len(),
                    settings.context
                );
            }
            train_in_dtype(c, config, &mut task, &mut model)
        }
        BertTask::Sentiment => {
            type Clf = BertTinyClassifier<2>;
            let mut model = dev
                .try_build_module::<Clf, f32>()
                .map_err(ModelError::from)?;
            neural_arch::init::init_weights(&mut model, c.seed, &rule)?;
            let mut config = run_config(
                c,
                "bert-sentiment",
                sentiment,
                model.num_trainable_params(),
                &settings,
            )?;
            let tok =
                WordPiece::from_json(&c.made_by_root(|| tokenizer(args, &config.out)?.to_json())?)?;
            if let Some(path) = &c.init_from {
                // A masked-LM checkpoint: its trunk, a fresh pooler and classifier.
                let mut opts = <Built<Clf, f32, D>>::load_options();
                opts.ignored.extend(
                    ["cls.predictions.bias", "cls.predictions.transform.*.*"].map(String::from),
                );
                opts.fresh
                    .extend(["bert.pooler.*", "classifier.*"].map(String::from));
                let report = load_safetensors(&mut model, path, &opts)
                    .with_context(|| format!("cannot start from {}", path.display()))?;
                println!(
                    "loaded {} tensors from {}; new: {}",
                    report.loaded,
                    path.display(),
                    if report.fresh.is_empty() {
                        "none".to_string()
                    } else {
                        report.fresh.join(", ")
                    }
                );
            }
            let snippets = load_snippets()?;
            let uci = load_uci()?;
            let mut task = SentimentTask::new(
                &tok,
                &snippets,
                &uci,
                settings.context,
                config.batch_size,
                config.seed,
                dev.clone(),
            )?;
            task.shard = c.shard()?;
            apply_epochs(c, &mut config, task.train.len())?;
            if task.shard.is_root() {
                println!(
                    "bert-sentiment tiny: {} parameters; {} training and {} held-out snippets, {} \
                     UCI sentences (out of domain){}",
                    model.num_trainable_params(),
                    task.train.len(),
                    task.valid.len(),
                    task.ood.iter().map(|(_, v)| v.len()).sum::<usize>(),
                    if c.init_from.is_none() && c.resume.is_none() {
                        "; no --init-from: training from scratch, without pre-training"
                    } else {
                        ""
                    }
                );
            }
            train_in_dtype(c, config, &mut task, &mut model)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_parse_and_malformed_lines_are_named() {
        let s = parse_snippets("1\t2.5\tA fine film.\n\n20\t-1\tDull.\n", "f").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].label(), s[1].label(), s[1].held_out()),
            (Some(1), Some(0), true)
        );
        let e = parse_snippets("1\t2.5\tok\n2 no tabs here\n", "snips.txt").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("snips.txt, line 2") && e.contains("fetch_data.py vader"),
            "{e}"
        );
        let e = parse_snippets("3\t9.0\tout of range\n", "f").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn uci_sentences_parse_and_bad_classes_are_named() {
        let v = parse_sentences(
            r#"[{"text":"Great.","class":1},{"text":"","class":null}]"#,
            "f",
        )
        .unwrap();
        assert_eq!((v.len(), v[0].class), (1, 1));
        let e = parse_sentences(r#"[{"text":"Fine.","class":null}]"#, "imdb.json").unwrap_err();
        assert!(e.to_string().contains("sentence 0 has no class"), "{e}");
        let e = parse_sentences(r#"[{"text":"x","class":2}]"#, "yelp.json").unwrap_err();
        assert!(
            e.to_string().contains("yelp.json: sentence 0 has class 2"),
            "{e}"
        );
        let e = parse_sentences("[{\"text\":", "amazon.json").unwrap_err();
        assert!(
            format!("{e:#}").contains("amazon.json is not a JSON array"),
            "{e}"
        );
    }

    #[test]
    fn masking_follows_bert() {
        let seq: Vec<usize> = std::iter::once(CLS)
            .chain((0..10_000).map(|i| 10 + i % 50))
            .chain(std::iter::once(SEP))
            .collect();
        let mut rng = StdRng::seed_from_u64(1);
        let (input, labels) = mask_sequence(&seq, 100, &mut rng);
        assert_eq!((input[0], labels[0]), (CLS, IGNORE_INDEX));
        let chosen: Vec<usize> = (0..seq.len())
            .filter(|&i| labels[i] != IGNORE_INDEX)
            .collect();
        let rate = chosen.len() as f64 / 10_000.0;
        assert!((rate - 0.15).abs() < 0.015, "{rate}");
        let masked = chosen.iter().filter(|&&i| input[i] == MASK).count() as f64;
        assert!((masked / chosen.len() as f64 - 0.8).abs() < 0.05);
        assert!(chosen.iter().all(|&i| labels[i] == seq[i] as i64));
        // A short sequence still predicts one piece.
        let (_, l) = mask_sequence(&[CLS, 42, SEP], 100, &mut rng);
        assert_eq!(l, [IGNORE_INDEX, 42, IGNORE_INDEX]);
    }

    #[test]
    fn the_gathered_head_gives_the_full_heads_loss_and_gradients() -> Result<(), ModelError> {
        use neural_arch_models::bert::masked_lm_loss;
        let dev = Cpu::seed_from_u64(3);
        let model = dev.build_module::<BertTiny, f32>();
        let p = pad(&[
            (
                vec![CLS, 900, 31, 4000, SEP],
                vec![-100, 900, -100, 4000, -100],
            ),
            (vec![CLS, 17, SEP], vec![-100, 17, -100]),
        ]);
        let (ids, mask, types) = tensors(&dev, &p, 2)?;
        let full = model.forward((
            ids.clone().traced(model.alloc_grads()),
            mask.clone(),
            types.clone().put_tape(OwnedTape::default()),
        ));
        let full = masked_lm_loss(full, &p.labels)?;
        let hidden = model.bert.forward((
            ids.traced(model.alloc_grads()),
            mask,
            types.put_tape(OwnedTape::default()),
        ));
        let (logits, targets) = head_at_labels(&model, hidden, &p.labels)?;
        assert_eq!(targets, [900, 4000, 17]);
        let part = cross_entropy(logits, &targets, Default::default())?;
        assert!((full.array() - part.array()).abs() < 1e-5);
        let (g1, g2) = (full.backward(), part.backward());
        for (a, b) in [
            (
                g1.get(&model.bert.embeddings.word_embeddings.weight)
                    .as_vec(),
                g2.get(&model.bert.embeddings.word_embeddings.weight)
                    .as_vec(),
            ),
            (
                g1.get(&model.cls.predictions.bias.bias).as_vec(),
                g2.get(&model.cls.predictions.bias.bias).as_vec(),
            ),
        ] {
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-6, "{worst}");
        }
        Ok(())
    }

    #[test]
    fn padding_masks_and_ignores_the_filler() {
        let p = pad(&[
            (vec![2, 7, 3], vec![-100, 7, -100]),
            (vec![2, 3], vec![-100, -100]),
        ]);
        assert_eq!(p.len, 3);
        assert_eq!(p.ids, [2, 7, 3, 2, 3, PAD]);
        assert_eq!(p.mask, [true, true, true, true, true, false]);
        assert_eq!(p.labels[5], IGNORE_INDEX);
    }
}
