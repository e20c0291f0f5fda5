//! # neural-arch-examples
//!
//! Training code behind the example binaries, kept in a library so that the binaries stay thin
//! and tests can run the same code.
//!
//! ## `train-digits`
//!
//! [`train_digits`] trains [`DigitsMlp`] on the 1,797 handwritten digits of the UCI
//! *Optical Recognition of Handwritten Digits* data set (8×8 images, pixel counts 0..=16), as
//! loaded by [`load_digits`]. The data are split once, by a shuffle with the fixed seed
//! [`SPLIT_SEED`], into 80 % training and 20 % held-out test examples; the test examples are only
//! used for the final accuracy. Training uses Adam on the mean cross-entropy of mini-batches,
//! reshuffled every epoch. The result is a [`DigitsSummary`], also written to
//! `<out>/summary.json`.
//!
//! ```no_run
//! use neural_arch_examples::{train_digits, DigitsConfig};
//!
//! let summary = train_digits(&DigitsConfig { epochs: 5, ..DigitsConfig::default() })?;
//! println!("test accuracy {:.1} %", 100.0 * summary.test_accuracy);
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! ## Data
//!
//! The digits come from the [`smartcore`] crate (feature `datasets`), which embeds them in its
//! source as `src/dataset/digits.xy`. They are the UCI data set by E. Alpaydin and C. Kaynak,
//! <https://doi.org/10.24432/C50P49>, licensed under CC BY 4.0
//! (<https://creativecommons.org/licenses/by/4.0/>).
#![deny(missing_docs)]

pub mod accuracy;
pub mod attention;
pub mod bert;
pub mod bpe;
pub mod cli;
pub mod clip_data;
pub mod images;
pub mod lm;
pub mod order;
pub mod wordpiece;

// dfdx allocates every tensor afresh. glibc gives the large freed blocks back to the kernel and
// faults them in again on the next step: a quarter of a GPT-2 run's CPU time was system time.
// mimalloc keeps them for reuse (when MIMALLOC_PURGE_DELAY=-1, which `cargo run` sets through
// .cargo/config.toml). Every binary and test of this crate links it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use neural_arch::dfdx::losses::cross_entropy_with_logits_loss;
use neural_arch::prelude::*;
use neural_arch_models::digits::{DigitsCnn, DigitsMlp, CLASSES, INPUTS};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

/// Seed of the shuffle that splits the digits into training and test examples. It is fixed, not
/// taken from [`DigitsConfig::seed`], so that runs with different seeds are scored on the same
/// held-out examples.
pub const SPLIT_SEED: u64 = 0x5eed_d161;

/// Hidden widths that [`train_digits`] supports: `H` of [`DigitsMlp<H>`] is a const parameter,
/// so each width is a separate instantiation.
pub const HIDDEN_CHOICES: [usize; 4] = [32, 64, 128, 256];

/// Where the digits come from, as recorded in the summary.
pub const DIGITS_SOURCE: &str = "UCI Optical Recognition of Handwritten Digits (8x8, 1797 \
    examples; CC BY 4.0, doi:10.24432/C50P49), via smartcore::dataset::digits";

/// The networks [`train_digits`] can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum DigitsModel {
    /// [`DigitsMlp`] on the 64 pixels.
    #[default]
    Mlp,
    /// [`DigitsCnn`] on the digits enlarged to 32×32.
    Cnn,
}

/// Settings of a [`train_digits`] run.
#[derive(Debug, Clone, PartialEq)]
pub struct DigitsConfig {
    /// Passes over the training examples; at least 1.
    pub epochs: usize,
    /// Examples per optimizer step; at least 1. The last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Adam learning rate; finite and positive.
    pub lr: f64,
    /// Which network: the perceptron or the CNN.
    pub model: DigitsModel,
    /// Hidden width `H` of [`DigitsMlp<H>`]; one of [`HIDDEN_CHOICES`] (the CNN ignores it).
    pub hidden: usize,
    /// Seed of the initial parameters, the batch order and dropout.
    pub seed: u64,
    /// Fraction of the examples held out for testing, in `(0, 1)`.
    pub test_fraction: f64,
    /// Directory for `summary.json`; created if missing.
    pub out: PathBuf,
    /// Show a progress bar on stderr (it stays hidden when stderr is not a terminal).
    pub progress: bool,
}

impl Default for DigitsConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 32,
            lr: 3e-3,
            model: DigitsModel::Mlp,
            hidden: 64,
            seed: 0,
            test_fraction: 0.2,
            out: PathBuf::from("runs/digits"),
            progress: false,
        }
    }
}

impl DigitsConfig {
    /// Checks the settings, with a message naming the bad one.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.epochs >= 1,
            "--epochs must be at least 1 (got {})",
            self.epochs
        );
        ensure!(
            self.batch_size >= 1,
            "--batch-size must be at least 1 (got {})",
            self.batch_size
        );
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr must be a positive number (got {})",
            self.lr
        );
        ensure!(
            HIDDEN_CHOICES.contains(&self.hidden),
            "--hidden must be one of {HIDDEN_CHOICES:?} (got {}): the width is a const \
             parameter of DigitsMlp<H>, compiled in for those values only",
            self.hidden
        );
        ensure!(
            self.test_fraction > 0.0 && self.test_fraction < 1.0,
            "the test fraction must lie strictly between 0 and 1 (got {})",
            self.test_fraction
        );
        Ok(())
    }
}

/// Loss and accuracy of one epoch, on the training batches as they were trained on (dropout on).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's training examples.
    pub train_loss: f64,
    /// Fraction of the epoch's training examples classified correctly.
    pub train_accuracy: f64,
}

/// What a [`train_digits`] run did and reached; serialised as `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DigitsSummary {
    /// The model's type, e.g. `DigitsMlp<64>`.
    pub model: String,
    /// Trainable parameters.
    pub params: usize,
    /// Where the data came from.
    pub data: String,
    /// Training examples.
    pub train_examples: usize,
    /// Held-out test examples.
    pub test_examples: usize,
    /// Seed of the train/test split ([`SPLIT_SEED`]).
    pub split_seed: u64,
    /// Seed of initialisation, batch order and dropout.
    pub seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Fraction of the held-out test examples classified correctly.
    pub test_accuracy: f64,
    /// Test examples classified correctly.
    pub test_correct: usize,
    /// Mean training loss of the last epoch.
    pub final_train_loss: f64,
    /// Training accuracy of the last epoch (with dropout on).
    pub final_train_accuracy: f64,
    /// Seconds from loading the data to the end of the test evaluation.
    pub wall_seconds: f64,
    /// Per-epoch training statistics.
    pub history: Vec<EpochStats>,
}

/// Labelled examples: `x` holds `len()` rows of [`INPUTS`] features, scaled to `[0, 1]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Examples {
    /// Row-major features, `INPUTS` per example.
    pub x: Vec<f32>,
    /// Class of each example, in `0..CLASSES`.
    pub y: Vec<usize>,
}

impl Examples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The examples at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Examples {
        let mut x = Vec::with_capacity(idx.len() * INPUTS);
        for &i in idx {
            x.extend_from_slice(&self.x[i * INPUTS..(i + 1) * INPUTS]);
        }
        Examples {
            x,
            y: idx.iter().map(|&i| self.y[i]).collect(),
        }
    }

    /// Splits into (train, test) after a shuffle seeded with `seed`; the test part has
    /// `round(len · test_fraction)` examples, at least one, and so does the train part.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Examples, Examples)> {
        let n = self.len();
        ensure!(n >= 2, "need at least 2 examples to split, have {n}");
        let n_test = ((n as f64 * test_fraction).round() as usize).clamp(1, n - 1);
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed));
        let (test, train) = idx.split_at(n_test);
        Ok((self.select(train), self.select(test)))
    }
}

/// Loads the 1,797 digits, scaling pixel counts from `0..=16` to `[0, 1]`.
pub fn load_digits() -> Result<Examples> {
    let ds = smartcore::dataset::digits::load_dataset();
    ensure!(
        ds.num_features == INPUTS && ds.data.len() == ds.num_samples * INPUTS,
        "digits data: expected {INPUTS} features per example, got {} ({} values for {} examples)",
        ds.num_features,
        ds.data.len(),
        ds.num_samples
    );
    ensure!(
        ds.target.len() == ds.num_samples,
        "digits data: {} labels for {} examples",
        ds.target.len(),
        ds.num_samples
    );
    let y = ds
        .target
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if t.fract() == 0.0 && (0.0..CLASSES as f32).contains(&t) {
                Ok(t as usize)
            } else {
                bail!("digits data: label {t} of example {i} is not a digit")
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let x = ds.data.iter().map(|&v| v / 16.0).collect();
    Ok(Examples { x, y })
}

/// Trains [`DigitsMlp`] as `cfg` says, evaluates it on the held-out split, writes
/// `cfg.out/summary.json` and returns the summary.
///
/// Errors (instead of panics) on bad settings ([`DigitsConfig::validate`]) and when the output
/// directory cannot be created or written; the directory is created before training starts, so
/// an unusable `out` fails fast.
pub fn train_digits(cfg: &DigitsConfig) -> Result<DigitsSummary> {
    cfg.validate()?;
    fs::create_dir_all(&cfg.out)
        .with_context(|| format!("cannot create output directory {}", cfg.out.display()))?;
    let summary = match (cfg.model, cfg.hidden) {
        (DigitsModel::Cnn, _) => train_cnn(cfg)?,
        (_, 32) => train_with::<32>(cfg)?,
        (_, 64) => train_with::<64>(cfg)?,
        (_, 128) => train_with::<128>(cfg)?,
        (_, 256) => train_with::<256>(cfg)?,
        (_, h) => bail!("unsupported hidden width {h}"),
    };
    write_summary(&cfg.out, &summary)?;
    Ok(summary)
}

/// The summary table of the chosen model (`DigitsMlp<hidden>` for [`HIDDEN_CHOICES`]).
pub fn model_summary(model: DigitsModel, hidden: usize) -> Result<neural_arch::Summary> {
    if model == DigitsModel::Cnn {
        return Ok(DigitsCnn::summary());
    }
    Ok(match hidden {
        32 => DigitsMlp::<32>::summary(),
        64 => DigitsMlp::<64>::summary(),
        128 => DigitsMlp::<128>::summary(),
        256 => DigitsMlp::<256>::summary(),
        h => bail!("unsupported hidden width {h}; choose one of {HIDDEN_CHOICES:?}"),
    })
}

/// Writes `summary` as pretty JSON to `dir/summary.json` and returns that path. The file is
/// written next to its place and renamed over it, so a reader never sees half a summary.
pub fn write_summary(dir: &Path, summary: &DigitsSummary) -> Result<PathBuf> {
    let path = dir.join("summary.json");
    let tmp = dir.join(".summary.json.tmp");
    let json = serde_json::to_string_pretty(summary).context("cannot serialise the summary")?;
    fs::write(&tmp, json + "\n").with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

type Dev = Cpu;

/// Features of `ex` at `idx` as a `[n, 64]` tensor.
fn features(dev: &Dev, ex: &Examples) -> Tensor<(usize, Const<INPUTS>), f32, Dev> {
    dev.tensor_from_vec(ex.x.clone(), (ex.len(), Const))
}

/// One-hot targets of `ex` as a `[n, 10]` tensor.
fn one_hot(dev: &Dev, ex: &Examples) -> Tensor<(usize, Const<CLASSES>), f32, Dev> {
    let mut v = vec![0.0f32; ex.len() * CLASSES];
    for (row, &c) in ex.y.iter().enumerate() {
        v[row * CLASSES + c] = 1.0;
    }
    dev.tensor_from_vec(v, (ex.len(), Const))
}

/// How many rows of `logits` (`CLASSES` per row) have their maximum at the label.
fn count_correct(logits: &[f32], labels: &[usize]) -> usize {
    logits
        .chunks_exact(CLASSES)
        .zip(labels)
        .filter(|(row, &label)| argmax(row) == label)
        .count()
}

/// The index of the largest value of `row` (the first of equal ones; 0 for an empty row): the
/// predicted class of a row of logits.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn progress_bar(cfg: &DigitsConfig) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(cfg.epochs as u64);
    pb.set_style(
        ProgressStyle::with_template("epoch {pos:>3}/{len} [{bar:30}] {elapsed_precise} {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    pb
}

fn train_with<const H: usize>(cfg: &DigitsConfig) -> Result<DigitsSummary> {
    let dev = Dev::seed_from_u64(cfg.seed);
    let model = dev.build_module::<DigitsMlp<H>, f32>();
    fit(
        cfg,
        &dev,
        model,
        format!("DigitsMlp<{H}>"),
        DigitsMlp::<H>::PARAMS,
        features,
    )
}

fn train_cnn(cfg: &DigitsConfig) -> Result<DigitsSummary> {
    let dev = Dev::seed_from_u64(cfg.seed);
    let model = dev.build_module::<DigitsCnn, f32>();
    fit(
        cfg,
        &dev,
        model,
        "DigitsCnn".into(),
        DigitsCnn::PARAMS,
        images,
    )
}

/// The training loop shared by the models: Adam on the cross-entropy of shuffled mini-batches,
/// then the held-out accuracy. `inputs` turns examples into the model's input tensor.
fn fit<M, S>(
    cfg: &DigitsConfig,
    dev: &Dev,
    mut model: M,
    name: String,
    params: usize,
    inputs: fn(&Dev, &Examples) -> Tensor<S, f32, Dev>,
) -> Result<DigitsSummary>
where
    S: Shape,
    M: TensorCollection<f32, Dev>
        + ZeroGrads<f32, Dev>
        + Module<Tensor<S, f32, Dev>, Output = Tensor<(usize, Const<CLASSES>), f32, Dev>>
        + ModuleMut<
            Tensor<S, f32, Dev, OwnedTape<f32, Dev>>,
            Output = Tensor<(usize, Const<CLASSES>), f32, Dev, OwnedTape<f32, Dev>>,
        >,
    <M as Module<Tensor<S, f32, Dev>>>::Error: std::fmt::Display,
    <M as ModuleMut<Tensor<S, f32, Dev, OwnedTape<f32, Dev>>>>::Error: std::fmt::Display,
{
    let start = Instant::now();
    let data = load_digits()?;
    let (train, test) = data.split(cfg.test_fraction, SPLIT_SEED)?;
    let mut opt = Adam::new(
        &model,
        AdamConfig {
            lr: cfg.lr,
            ..Default::default()
        },
    );
    let mut grads = model.alloc_grads();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    // Dropout masks come from a per-thread generator: seeded here, the same seed gives the same
    // run even after other training on this thread.
    neural_arch::layers::seed_dropout(cfg.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut history = Vec::with_capacity(cfg.epochs);
    let mut steps = 0;

    let pb = progress_bar(cfg);
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for idx in order.chunks(cfg.batch_size) {
            let batch = train.select(idx);
            let x = inputs(dev, &batch);
            let y = one_hot(dev, &batch);
            let logits = model
                .try_forward_mut(x.traced(grads))
                .map_err(|e| anyhow::anyhow!("forward failed: {e}"))?;
            correct += count_correct(&logits.with_empty_tape().as_vec(), &batch.y);
            let loss = cross_entropy_with_logits_loss(logits, y);
            loss_sum += f64::from(loss.array()) * batch.len() as f64;
            grads = loss.backward();
            opt.update(&mut model, &grads)
                .context("optimizer update failed")?;
            model.zero_grads(&mut grads);
            steps += 1;
        }
        let stats = EpochStats {
            epoch,
            train_loss: loss_sum / train.len() as f64,
            train_accuracy: correct as f64 / train.len() as f64,
        };
        ensure!(
            stats.train_loss.is_finite(),
            "training diverged in epoch {epoch} (loss {}); try a smaller --lr",
            stats.train_loss
        );
        pb.set_message(format!(
            "loss {:.4}  train acc {:.1}%",
            stats.train_loss,
            100.0 * stats.train_accuracy
        ));
        pb.inc(1);
        history.push(stats);
    }
    pb.finish();
    if !pb.is_hidden() {
        // indicatif leaves the cursor on the bar's line.
        eprintln!();
    }

    // Evaluation: `forward` runs dropout and batch norm in inference mode.
    let logits = model
        .try_forward(inputs(dev, &test))
        .map_err(|e| anyhow::anyhow!("forward failed: {e}"))?;
    let test_correct = count_correct(&logits.as_vec(), &test.y);
    let last = history.last().cloned().context("no epoch was run")?;
    Ok(DigitsSummary {
        model: name,
        params,
        data: DIGITS_SOURCE.to_string(),
        train_examples: train.len(),
        test_examples: test.len(),
        split_seed: SPLIT_SEED,
        seed: cfg.seed,
        epochs: cfg.epochs,
        batch_size: cfg.batch_size,
        lr: cfg.lr,
        steps,
        test_accuracy: test_correct as f64 / test.len() as f64,
        test_correct,
        final_train_loss: last.train_loss,
        final_train_accuracy: last.train_accuracy,
        wall_seconds: start.elapsed().as_secs_f64(),
        history,
    })
}

/// Each 8×8 digit enlarged 4× (every pixel a 4×4 block) to the `[n, 1, 32, 32]` a CIFAR-sized
/// CNN takes.
fn images(dev: &Dev, ex: &Examples) -> Tensor<(usize, Const<1>, Const<32>, Const<32>), f32, Dev> {
    let mut v = Vec::with_capacity(ex.len() * 32 * 32);
    for img in ex.x.chunks_exact(INPUTS) {
        for row in 0..32 {
            for col in 0..32 {
                v.push(img[(row / 4) * 8 + col / 4]);
            }
        }
    }
    dev.tensor_from_vec(v, (ex.len(), Const, Const, Const))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_load_and_split_deterministically() {
        let data = load_digits().unwrap();
        assert_eq!(data.len(), 1797);
        assert_eq!(data.x.len(), 1797 * INPUTS);
        assert!(data.x.iter().all(|v| (0.0..=1.0).contains(v)));
        let mut counts = [0usize; CLASSES];
        data.y.iter().for_each(|&c| counts[c] += 1);
        assert!(
            counts.iter().all(|&c| (170..=190).contains(&c)),
            "{counts:?}"
        );

        let (train, test) = data.split(0.2, SPLIT_SEED).unwrap();
        assert_eq!((train.len(), test.len()), (1438, 359));
        let (train2, test2) = data.split(0.2, SPLIT_SEED).unwrap();
        assert_eq!((train, test), (train2, test2));
    }

    #[test]
    fn bad_settings_are_errors() {
        let ok = DigitsConfig::default();
        assert!(ok.validate().is_ok());
        for (cfg, word) in [
            (
                DigitsConfig {
                    batch_size: 0,
                    ..ok.clone()
                },
                "--batch-size",
            ),
            (
                DigitsConfig {
                    epochs: 0,
                    ..ok.clone()
                },
                "--epochs",
            ),
            (
                DigitsConfig {
                    lr: f64::NAN,
                    ..ok.clone()
                },
                "--lr",
            ),
            (
                DigitsConfig {
                    lr: -1.0,
                    ..ok.clone()
                },
                "--lr",
            ),
            (
                DigitsConfig {
                    hidden: 100,
                    ..ok.clone()
                },
                "--hidden",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(word), "{err}");
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1);
        assert_eq!(count_correct(&[0.0; 2 * CLASSES], &[0, 1]), 1);
    }
}
