//! Trains CLIP (`tiny` preset: 32×32 images in 4×4 patches, captions of up to 32 tokens) on
//! image–caption pairs: procedurally generated scenes ("a large red circle on the left and a
//! blue square on the right", see `neural_arch_examples::clip_data`), the Twemoji images with
//! their names (`--data emoji`, needs `python3 tools/fetch_data.py emoji`), or both. The loss is
//! CLIP's symmetric contrastive loss with the model's learned temperature.
//!
//! Evaluation, on scenes that each hold a shape–colour pair never seen in training:
//! `eval_loss`; `r_at_1` / `r_at_10`, image→text retrieval among the evaluation batch's
//! captions (a hit is a caption identical to the image's own, since small scenes repeat
//! captions; `chance_r_at_1` / `chance_r_at_10` are the exact rates of a random ranking);
//! `r_at_1_seen` on scenes of training combinations; `zero_shot_colour` and `zero_shot_shape`,
//! the accuracy of classifying the colour ("a red object", ...) and the shape ("a circle", ...)
//! of the 80 single-object held-out scenes with `zero_shot_probabilities`, and
//! `zero_shot_colour_seen` / `zero_shot_shape_seen` on 80 of training combinations; with emoji,
//! `emoji_r_at_1` / `emoji_r_at_10` on held-out emoji. At the end (and with `--eval-only`),
//! `DIR/similarity.png` shows the caption–image cosine similarities of 16 evaluation pairs.
//!
//! With `--distributed` (under `mpirun`), each rank encodes its shard of every batch and the
//! embeddings are all-gathered, so the loss still compares each image with every caption of the
//! whole batch, as one process does.
//!
//! `DIR/vocab.json` holds the word vocabulary, and the checkpoint the data source and the
//! evaluation size; `--resume` reads them, so a resumed run sees the same batches and
//! evaluates on the same pairs.
//!
//! ```text
//! cargo run --release -p neural-arch-examples --bin train-clip -- --steps 1500 --batch-size 96 --out runs/clip
//! cargo run --release -p neural-arch-examples --bin train-clip -- --resume runs/clip --steps 2000
//! cargo run --release -p neural-arch-examples --bin train-clip -- --data both --out runs/clip-both
//! ```

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use neural_arch::amp::{HalfDevice, MixedDevice, MixedTask};
use neural_arch::checkpoint::load_safetensors;
use neural_arch::dfdx::dtypes::{bf16, f16};
use neural_arch::dist::{all_gather_rows, Collective, Shard};
use neural_arch::prelude::*;
use neural_arch::train::{Metrics, RunSummary, StepOutput, Task};
use neural_arch_examples::argmax;
use neural_arch_examples::cli::{
    apply_epochs, report, run_config, task_settings, train_or_evaluate, train_or_evaluate_mixed,
    CommonArgs, Defaults, DeviceChoice,
};
use neural_arch_examples::clip_data::{
    self as data, eval_scenes, mix, normalise, train_scene, Emoji, Scene, Split, Vocab, COLOURS,
    PIXELS, SHAPES, SIDE,
};
use neural_arch_examples::lm::fetched;
use neural_arch_models::clip::{normalize, zero_shot_probabilities, ClipTiny};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::ExitCode;
use std::rc::Rc;

type Clip<D> = Built<ClipTiny, f32, D>;
/// ClipTiny's projection width.
const PR: usize = 128;
/// Pairs per forward pass in evaluation, to bound memory.
const CHUNK: usize = 128;
/// What `--epochs` counts for scenes, which are unlimited: 10 000 pairs.
const SCENES_PER_EPOCH: usize = 10_000;
/// Pairs shown in `similarity.png`.
const SHOWN: usize = 16;

/// Where the image–caption pairs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum DataKind {
    /// Generated scenes of shapes.
    Scenes,
    /// The fetched Twemoji images with their names.
    Emoji,
    /// Both, half and half.
    Both,
}

impl DataKind {
    fn name(self) -> &'static str {
        match self {
            DataKind::Scenes => "scenes",
            DataKind::Emoji => "emoji",
            DataKind::Both => "both",
        }
    }
}

/// The settings of a run that a resume keeps (see [`task_settings`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct Settings {
    data: DataKind,
    eval_size: usize,
}

/// Train CLIP on captioned scenes of shapes (and emoji).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Training data: scenes, emoji or both (default scenes; a resumed run keeps its own).
    #[arg(long, value_enum)]
    data: Option<DataKind>,
    /// Image–caption pairs of the retrieval evaluation batches (default 256; a resumed run
    /// keeps its own).
    #[arg(long)]
    eval_size: Option<usize>,
}

/// A caption and its image (`[3, 32, 32]` in `[0, 1]`).
type Pair = (String, Vec<f32>);

struct ClipTask<D> {
    data: DataKind,
    seed: u64,
    batch: usize,
    vocab: Vocab,
    emoji_train: Vec<Emoji>,
    /// Held-out pairs of the retrieval evaluation (scenes, or emoji with `--data emoji`).
    eval: Vec<Pair>,
    /// Scenes of training combinations (not with `--data emoji`).
    seen: Vec<Pair>,
    /// Held-out emoji, with `--data both`.
    emoji_eval: Vec<Pair>,
    /// Single-object held-out scenes for zero-shot classification (not with `--data emoji`).
    singles: Vec<Scene>,
    /// Single-object scenes of training combinations, likewise.
    singles_seen: Vec<Scene>,
    dev: D,
    /// The `--distributed` group: each rank encodes its shard of every batch, and the loss is
    /// computed on the embeddings of the whole batch, all-gathered.
    group: Option<Rc<dyn Collective>>,
    /// Image×caption cosine similarities of `eval` at the last evaluation.
    last_sim: Option<Vec<f32>>,
}

/// Token ids `[n, T]` of captions.
type Ids<D> = Tensor<(usize, usize), usize, D>;
/// Images `[n, 3, 32, 32]`.
type Images<D> = Tensor<(usize, Const<3>, Const<SIDE>, Const<SIDE>), f32, D>;
/// Embeddings `[n, PR]` in element type `E` on tape `T`.
type Embeddings<E, D, T> = Tensor<(usize, Const<PR>), E, D, T>;

fn scene_pair(s: &Scene) -> Pair {
    (s.caption(), s.render())
}

impl<D: HalfDevice> ClipTask<D>
where
    ModelError: From<<D as HasErr>::Err>,
{
    /// Training pair at stream position `position`: a pure function of the seed and it.
    fn pair_at(&self, position: u64) -> Pair {
        let emoji = match self.data {
            DataKind::Scenes => false,
            DataKind::Emoji => true,
            DataKind::Both => {
                StdRng::seed_from_u64(mix(self.seed, 0x5352_4300, position)).gen_bool(0.5)
            }
        };
        if emoji && !self.emoji_train.is_empty() {
            let mut rng = StdRng::seed_from_u64(mix(self.seed, 0x454d_4f4a_4900, position));
            let e = &self.emoji_train[rng.gen_range(0..self.emoji_train.len())];
            (e.caption.clone(), e.pixels.clone())
        } else {
            scene_pair(&train_scene(self.seed, position))
        }
    }

    /// Token ids `[n, T]` (T: the longest caption with its end-of-text token; right padding
    /// cannot change the text embedding, read causally at the end-of-text token) and
    /// normalised images `[n, 3, 32, 32]`.
    fn tensors(&self, captions: &[&str], images: &[&[f32]]) -> Result<(Ids<D>, Images<D>)> {
        let t = captions
            .iter()
            .map(|c| Vocab::token_count(c))
            .max()
            .unwrap_or(1);
        let ids: Vec<usize> = captions
            .iter()
            .flat_map(|c| self.vocab.encode(c, t))
            .collect();
        let mut px: Vec<f32> = Vec::with_capacity(images.len() * PIXELS);
        for img in images {
            px.extend_from_slice(img);
        }
        normalise(&mut px);
        let ids = self
            .dev
            .try_tensor_from_vec(ids, (captions.len(), t))
            .map_err(ModelError::from)?;
        let px = self
            .dev
            .try_tensor_from_vec(px, (images.len(), Const, Const, Const))
            .map_err(ModelError::from)?;
        Ok((ids, px))
    }

    /// This process's share of step `step`'s batch (the whole batch in one process, the
    /// rank's shard with `--distributed`): token ids, images, and how many pairs.
    fn train_batch(&self, step: usize) -> Result<(Ids<D>, Images<D>, usize), ModelError> {
        let shard = self.group.as_ref().map_or(Shard::SINGLE, |g| g.shard());
        let pairs: Vec<Pair> = shard
            .rows(self.batch)?
            .map(|i| self.pair_at((step * self.batch + i) as u64))
            .collect();
        let captions: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
        let images: Vec<&[f32]> = pairs.iter().map(|p| p.1.as_slice()).collect();
        let (ids, px) = self
            .tensors(&captions, &images)
            .map_err(|e| ModelError::Config(format!("{e:#}")))?;
        Ok((ids, px, pairs.len()))
    }

    /// CLIP's loss on the image and text embeddings of this process's share of a batch. The
    /// loss compares every image with every caption of the batch, so a `--distributed` rank
    /// first all-gathers the other ranks' embeddings (with the gradient to its own; see
    /// `neural_arch::dist::all_gather_rows`): every rank computes the loss of the whole batch,
    /// as one process would.
    fn batch_loss<E, T>(
        &self,
        image: Embeddings<E, D, T>,
        text: Embeddings<E, D, T>,
        logit_scale: &LogitScaleModule<E, D>,
    ) -> Result<Tensor<Rank0, E, D, T>, ModelError>
    where
        E: Elem,
        D: Device<E>,
        T: Tape<E, D> + Merge<T>,
    {
        let (image, text) = match &self.group {
            Some(g) => (
                all_gather_rows(g.as_ref(), image)?,
                all_gather_rows(g.as_ref(), text)?,
            ),
            None => (image, text),
        };
        clip_loss(image, text, logit_scale)
    }

    /// L2-normalised text and image features (`n × PR` each) of `captions` and `images`.
    fn features(
        &self,
        model: &Clip<D>,
        captions: &[&str],
        images: &[&[f32]],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut text, mut image) = (Vec::new(), Vec::new());
        let n = captions.len().max(images.len());
        for start in (0..n).step_by(CHUNK) {
            let c = &captions[start.min(captions.len())..(start + CHUNK).min(captions.len())];
            let i = &images[start.min(images.len())..(start + CHUNK).min(images.len())];
            let (ids, px) = self.tensors(c, i)?;
            let (t, v) = model.try_forward((ids, px))?;
            text.extend(normalize(t)?.as_vec());
            image.extend(normalize(v)?.as_vec());
        }
        Ok((text, image))
    }

    /// Loss and image×text cosine similarities of `pairs`.
    fn score(&self, model: &Clip<D>, pairs: &[Pair]) -> Result<(f64, Vec<f32>)> {
        let captions: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
        let images: Vec<&[f32]> = pairs.iter().map(|p| p.1.as_slice()).collect();
        let (text, image) = self.features(model, &captions, &images)?;
        let n = pairs.len();
        let sim: Vec<f32> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                dot(&image[i * PR..(i + 1) * PR], &text[j * PR..(j + 1) * PR])
            })
            .collect();
        let it = self
            .dev
            .try_tensor_from_vec(image, (n, Const::<PR>))
            .map_err(ModelError::from)?;
        let tt = self
            .dev
            .try_tensor_from_vec(text, (n, Const::<PR>))
            .map_err(ModelError::from)?;
        let loss = clip_loss(it, tt, &model.logit_scale)?.as_vec()[0] as f64;
        Ok((loss, sim))
    }

    /// Zero-shot accuracy on the single-object scenes: `prompts[k]` describes class `k`,
    /// `label(scene)` is the true class.
    fn zero_shot(
        &self,
        model: &Clip<D>,
        scenes: &[Scene],
        prompts: &[String],
        label: impl Fn(&Scene) -> usize,
    ) -> Result<f64> {
        let captions: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let rendered: Vec<Vec<f32>> = scenes.iter().map(|s| s.render()).collect();
        let images: Vec<&[f32]> = rendered.iter().map(|v| v.as_slice()).collect();
        let (text, image) = self.features(model, &captions, &images)?;
        let classes = self
            .dev
            .try_tensor_from_vec(text, (prompts.len(), Const::<PR>))
            .map_err(ModelError::from)?;
        let images = self
            .dev
            .try_tensor_from_vec(image, (scenes.len(), Const::<PR>))
            .map_err(ModelError::from)?;
        let p = zero_shot_probabilities(images, classes, &model.logit_scale)?.as_vec();
        let correct = scenes
            .iter()
            .zip(p.chunks_exact(prompts.len()))
            .filter(|(s, row)| argmax(row) == label(s))
            .count();
        Ok(correct as f64 / scenes.len().max(1) as f64)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Image→text recall at `k`: the share of images (rows of `sim`, `n × n`) with a caption
/// identical to their own among their `k` most similar captions.
fn recall_at(sim: &[f32], captions: &[String], k: usize) -> f64 {
    let n = captions.len();
    if n == 0 {
        return 0.0;
    }
    let hits = (0..n)
        .filter(|&i| {
            let row = &sim[i * n..(i + 1) * n];
            let mut order: Vec<usize> = (0..n).collect();
            // Ties broken by index, so that the metric is deterministic.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order[..k.min(n)]
                .iter()
                .any(|&j| captions[j] == captions[i])
        })
        .count();
    hits as f64 / n as f64
}

/// The recall at `k` of a random ranking: with `m` captions identical to image `i`'s among
/// `n`, `1 - C(n - m, k) / C(n, k)`, averaged over the images.
fn chance_at(captions: &[String], k: usize) -> f64 {
    let n = captions.len();
    if n == 0 {
        return 0.0;
    }
    let total: f64 = captions
        .iter()
        .map(|c| {
            let m = captions.iter().filter(|d| *d == c).count();
            let miss: f64 = (0..k.min(n))
                .map(|i| (n.saturating_sub(m + i)) as f64 / (n - i) as f64)
                .product();
            1.0 - miss
        })
        .sum();
    total / n as f64
}

/// The contrastive loss on the working copy in one half type.
macro_rules! clip_mixed_task {
    ($e:ty) => {
        impl<D: HalfDevice> MixedTask<Built<ClipTiny, $e, D>, D, $e> for ClipTask<D>
        where
            ModelError: From<<D as HasErr>::Err>,
        {
            fn half_loss(
                &mut self,
                model: &mut Built<ClipTiny, $e, D>,
                step: usize,
                grads: Gradients<$e, D>,
            ) -> Result<(Tensor<Rank0, $e, D, OwnedTape<$e, D>>, usize), ModelError> {
                let (ids, px, n) = self.train_batch(step)?;
                let px = <D as MixedDevice<$e>>::to_half(px)?;
                let (text, image) = model.try_forward((ids.traced(grads), px.leaky_traced()))?;
                Ok((self.batch_loss(image, text, &model.logit_scale)?, n))
            }
        }
    };
}

clip_mixed_task!(f16);
clip_mixed_task!(bf16);

impl<D: HalfDevice> Task<Clip<D>, f32, D> for ClipTask<D>
where
    ModelError: From<<D as HasErr>::Err>,
{
    fn train_step(
        &mut self,
        model: &mut Clip<D>,
        step: usize,
        grads: Gradients<f32, D>,
    ) -> Result<StepOutput<f32, D>, ModelError> {
        let (ids, px, n) = self.train_batch(step)?;
        let (text, image) = model.try_forward((ids.traced(grads), px.leaky_traced()))?;
        let loss = self.batch_loss(image, text, &model.logit_scale)?;
        // With --distributed every rank holds the whole batch's loss; the trainer reports the
        // mean over the ranks, which is that loss.
        let value = loss.as_vec()[0] as f64;
        Ok(StepOutput {
            loss: value,
            grads: loss.try_backward()?,
            items: n,
        })
    }

    /// OpenAI's clamp of the temperature to at most 100, after every optimizer step.
    fn after_step(&mut self, model: &mut Clip<D>) -> Result<(), ModelError> {
        model.logit_scale.clamp();
        Ok(())
    }

    fn evaluate(&mut self, model: &mut Clip<D>) -> Result<Metrics, ModelError> {
        self.evaluate_inner(model)
            .map_err(|e| ModelError::Config(format!("{e:#}")))
    }

    fn samples(&mut self, _model: &mut Clip<D>) -> Result<Vec<String>, ModelError> {
        let Some(sim) = &self.last_sim else {
            return Ok(Vec::new());
        };
        let n = self.eval.len();
        let mut lines = Vec::new();
        for i in (0..n).step_by((n / 3).max(1)).take(3) {
            let row = &sim[i * n..(i + 1) * n];
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top: Vec<String> = order
                .iter()
                .take(3)
                .map(|&j| format!("\"{}\" {:.2}", self.eval[j].0, row[j]))
                .collect();
            lines.push(format!(
                "  image of \"{}\" -> {}",
                self.eval[i].0,
                top.join(", ")
            ));
        }
        Ok(lines)
    }
}

impl<D: HalfDevice> ClipTask<D>
where
    ModelError: From<<D as HasErr>::Err>,
{
    fn evaluate_inner(&mut self, model: &Clip<D>) -> Result<Metrics> {
        let mut m = Metrics::new();
        let (loss, sim) = self.score(model, &self.eval)?;
        let captions: Vec<String> = self.eval.iter().map(|p| p.0.clone()).collect();
        m.insert("eval_loss".into(), loss);
        m.insert("r_at_1".into(), recall_at(&sim, &captions, 1));
        m.insert("r_at_10".into(), recall_at(&sim, &captions, 10));
        m.insert("chance_r_at_1".into(), chance_at(&captions, 1));
        m.insert("chance_r_at_10".into(), chance_at(&captions, 10));
        m.insert(
            "logit_scale".into(),
            (model.logit_scale.logit_scale.as_vec()[0] as f64).exp(),
        );
        self.last_sim = Some(sim);
        if !self.seen.is_empty() {
            let (_, sim) = self.score(model, &self.seen)?;
            let captions: Vec<String> = self.seen.iter().map(|p| p.0.clone()).collect();
            m.insert("r_at_1_seen".into(), recall_at(&sim, &captions, 1));
        }
        if !self.emoji_eval.is_empty() {
            let (_, sim) = self.score(model, &self.emoji_eval)?;
            let captions: Vec<String> = self.emoji_eval.iter().map(|p| p.0.clone()).collect();
            m.insert("emoji_r_at_1".into(), recall_at(&sim, &captions, 1));
            m.insert("emoji_r_at_10".into(), recall_at(&sim, &captions, 10));
        }
        let colours: Vec<String> = COLOURS.iter().map(|c| format!("a {c} object")).collect();
        let shapes: Vec<String> = SHAPES.iter().map(|s| format!("a {s}")).collect();
        for (scenes, suffix) in [(&self.singles, ""), (&self.singles_seen, "_seen")] {
            if scenes.is_empty() {
                continue;
            }
            let colour = self.zero_shot(model, scenes, &colours, |s| s.objects[0].colour)?;
            m.insert(format!("zero_shot_colour{suffix}"), colour);
            let shape = self.zero_shot(model, scenes, &shapes, |s| s.objects[0].shape)?;
            m.insert(format!("zero_shot_shape{suffix}"), shape);
        }
        Ok(m)
    }

    /// Draws the caption×image similarities of the first [`SHOWN`] evaluation pairs of the last
    /// evaluation to `path` (nothing when there was none).
    fn write_similarity(&self, path: &Path, title: &str) -> Result<()> {
        let Some(sim) = &self.last_sim else {
            return Ok(());
        };
        let n = self.eval.len();
        let k = n.min(SHOWN);
        // Rows: captions; columns: images. `sim` is image × caption.
        let values: Vec<f64> = (0..k * k)
            .map(|x| sim[(x % k) * n + x / k] as f64)
            .collect();
        let labels: Vec<String> = self.eval[..k].iter().map(|p| p.0.clone()).collect();
        let thumbs: Vec<Vec<[u8; 3]>> = self.eval[..k]
            .iter()
            .map(|p| {
                (0..SIDE * SIDE)
                    .map(|q| {
                        let c = |ch: usize| (p.1[ch * SIDE * SIDE + q] * 255.0).round() as u8;
                        [c(0), c(1), c(2)]
                    })
                    .collect()
            })
            .collect();
        neural_arch::plot::write_heatmap(&values, &labels, &thumbs, SIDE, title, path)?;
        Ok(())
    }
}

fn run(cli: &Cli) -> Result<RunSummary> {
    let c = &cli.common;
    match c.device_choice()? {
        DeviceChoice::Cpu => run_on(Cpu::seed_from_u64(c.seed), cli),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => run_on(neural_arch_examples::cli::cuda_device(c, n)?, cli),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => unreachable!("device_choice refuses CUDA in a build without it"),
    }
}

fn run_on<D>(dev: D, cli: &Cli) -> Result<RunSummary>
where
    D: HalfDevice + DeviceBuildExt,
    ModelError: From<<D as HasErr>::Err>,
{
    let c = &cli.common;
    c.apply_recompute("clip", false)?;
    let group = c.group()?;
    let root = c.shard()?.is_root();
    match c.preset.as_str() {
        "tiny" => {}
        "vit-b-32" => bail!(
            "preset `vit-b-32` takes 224×224 images and 77-token captions, not these 32×32 \
             scenes; use --preset tiny"
        ),
        other => bail!("unknown preset `{other}` for clip; choose tiny"),
    }
    let defaults = Defaults {
        steps: 1500,
        batch_size: 96,
        lr: 5e-4,
        eval_every: 250,
        warmup_steps: 100,
        unit: "images",
    };
    let mut model = dev
        .try_build_module::<ClipTiny, f32>()
        .map_err(ModelError::from)?;
    neural_arch::init::init_weights(
        &mut model,
        c.seed,
        neural_arch::init::transformer_rule(0.02),
    )?;
    if let Some(path) = &c.init_from {
        load_safetensors(&mut model, path, &Clip::<D>::load_options())
            .with_context(|| format!("cannot start from {}", path.display()))?;
    }
    let given = Settings {
        data: cli.data.unwrap_or(DataKind::Scenes),
        eval_size: cli.eval_size.unwrap_or(256),
    };
    let settings = task_settings(c, given)?;
    if let Some(d) = cli.data.filter(|&d| d != settings.data) {
        bail!(
            "{} was trained on --data {}; it cannot continue on --data {}",
            c.resume.as_deref().unwrap_or(Path::new(".")).display(),
            settings.data.name(),
            d.name()
        );
    }
    let Settings {
        data: kind,
        eval_size,
    } = settings;
    anyhow::ensure!(eval_size >= 2, "--eval-size must be at least 2");
    let mut config = run_config(
        c,
        "clip",
        &defaults,
        model.num_trainable_params(),
        &settings,
    )?;
    let (emoji_train, emoji_test) = if kind == DataKind::Scenes {
        (Vec::new(), Vec::new())
    } else {
        data::load_emoji(&fetched("emoji")?)?
    };
    let per_epoch = if kind == DataKind::Emoji {
        emoji_train.len()
    } else {
        SCENES_PER_EPOCH
    };
    apply_epochs(c, &mut config, per_epoch)?;
    // The vocabulary of a resumed run is its own (vocab.json).
    let vocab_path = config.out.join("vocab.json");
    // Rank 0 builds (or reloads) and saves it; every rank uses its copy.
    let json = c.made_by_root(|| {
        if c.resume.is_some() && vocab_path.exists() {
            let (vocab, name) = Vocab::load(&vocab_path)?;
            anyhow::ensure!(
                name == kind.name(),
                "{} is a vocabulary of --data {name}, but the checkpoint says --data {}; the \
                 run directory is damaged",
                vocab_path.display(),
                kind.name()
            );
            return Ok(vocab.to_json(&name));
        }
        let scene_words = data::scene_words();
        let mut captions: Vec<&str> = Vec::new();
        if kind != DataKind::Emoji {
            captions.push(&scene_words);
        }
        captions.extend(emoji_train.iter().map(|e| e.caption.as_str()));
        let v = Vocab::build(captions)?;
        std::fs::create_dir_all(&config.out)
            .with_context(|| format!("cannot create {}", config.out.display()))?;
        v.save(&vocab_path, kind.name())?;
        Ok(v.to_json(kind.name()))
    })?;
    let (vocab, _) = Vocab::from_json(&json, &vocab_path)?;
    let to_pairs = |v: &[Emoji]| -> Vec<Pair> {
        v.iter()
            .take(eval_size)
            .map(|e| (e.caption.clone(), e.pixels.clone()))
            .collect()
    };
    let scenes = kind != DataKind::Emoji;
    let eval: Vec<Pair> = if scenes {
        eval_scenes(Split::HeldOut, eval_size)
            .iter()
            .map(scene_pair)
            .collect()
    } else {
        to_pairs(&emoji_test)
    };
    let mut task = ClipTask {
        data: kind,
        seed: config.seed,
        batch: config.batch_size,
        vocab,
        seen: if scenes {
            eval_scenes(Split::Train, eval_size)
                .iter()
                .map(scene_pair)
                .collect()
        } else {
            Vec::new()
        },
        emoji_eval: if kind == DataKind::Both {
            to_pairs(&emoji_test)
        } else {
            Vec::new()
        },
        singles: if scenes {
            data::singles(Split::HeldOut)
        } else {
            Vec::new()
        },
        singles_seen: if scenes {
            data::singles(Split::Train)
        } else {
            Vec::new()
        },
        emoji_train,
        eval,
        dev: dev.clone(),
        group,
        last_sim: None,
    };
    if root {
        println!(
            "clip {}: {} parameters; data {}: vocabulary of {} words{}; evaluating on {} held-out \
         pairs",
            c.preset,
            model.num_trainable_params(),
            kind.name(),
            task.vocab.len(),
            if kind == DataKind::Scenes {
                String::new()
            } else {
                format!(", {} training emoji", task.emoji_train.len())
            },
            task.eval.len()
        );
    }
    let out = config.out.clone();
    let title = format!("clip {}: caption x image cosine similarity", c.preset);
    // A resumed run keeps the element type it started with.
    let summary = match config.dtype.as_str() {
        "f16" => train_or_evaluate_mixed::<f16, _, _, _>(c, config, &mut task, &mut model, 0.1)?,
        "bf16" => train_or_evaluate_mixed::<bf16, _, _, _>(c, config, &mut task, &mut model, 0.1)?,
        _ => train_or_evaluate(c, config, &mut task, &mut model, 0.1)?,
    };
    if root {
        task.write_similarity(&out.join("similarity.png"), &title)?;
    }
    Ok(summary)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    report(&cli.common, run(&cli))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_identical_captions() {
        let caps: Vec<String> = ["a", "b", "a"].iter().map(|s| s.to_string()).collect();
        // Image 0 prefers caption 2 (the same text): a hit; image 1 prefers caption 0: a miss.
        let sim = [0.1, 0.0, 0.9, 0.8, 0.1, 0.0, 0.0, 0.0, 0.5];
        assert!((recall_at(&sim, &caps, 1) - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(recall_at(&sim, &caps, 3), 1.0);
        let distinct: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        assert!((chance_at(&distinct, 1) - 0.1).abs() < 1e-9);
        assert!((chance_at(&distinct, 10) - 1.0).abs() < 1e-9);
        // Two of three captions are "a": their images hit with probability 2/3.
        assert!((chance_at(&caps, 1) - (2.0 / 3.0 * 2.0 + 1.0 / 3.0) / 3.0).abs() < 1e-9);
    }
}
