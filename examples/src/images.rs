//! Image classification on Fashion-MNIST (ViT, ResNet): the IDX reader, preprocessing to the
//! CIFAR-shaped input of the `tiny` presets, batches, evaluation and the trainer's `run`.
//!
//! The data set is Zalando's Fashion-MNIST (60 000 training and 10 000 test images of 28×28
//! grey pixels, 10 classes), fetched with `python3 tools/fetch_data.py fashion-mnist` into
//! `$NEURAL_ARCH_DATA/fashion-mnist/` (default `~/.cache/neural-arch/fashion-mnist/`) as the
//! four gzipped IDX files of the original release.
//!
//! Preprocessing turns each image into the `[3, 32, 32]` input of [`VitTiny`] and
//! [`ResNetTiny`] (CIFAR-shaped presets): pixels scaled to `[0, 1]`, placed in a 32×32 black
//! canvas (2 pixels of zeros on each side; the background of the images is black too), the
//! grey channel repeated three times, and normalised with Fashion-MNIST's mean 0.2860 and
//! standard deviation 0.3530. With augmentation (ResNet's default), the 28×28 image lands at a
//! random offset of 0..=4 pixels in each direction (a random 32×32 crop of the image padded by
//! 4 pixels) and is flipped left-right with probability ½.
//!
//! Batches are a pure function of the run's seed and the step: position `p = step·B + i` of
//! the stream is example `perm_e[p mod N]` of epoch `e = p div N`, where `perm_e` is a
//! permutation drawn from a generator seeded with the seed and `e`; augmentation draws from a
//! generator seeded with the seed and `p`. A resumed run therefore sees the same batches.
//!
//! [`VitTiny`]: neural_arch_models::vit::VitTiny
//! [`ResNetTiny`]: neural_arch_models::resnet::ResNetTiny

use crate::argmax;
use crate::cli::{
    apply_epochs, run_config, task_settings, train_or_evaluate, train_or_evaluate_mixed,
    CommonArgs, Defaults, DeviceChoice, InitRule,
};
use crate::lm::fetched;
use crate::order::{mix, EpochOrder};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use neural_arch::amp::{HalfDevice, HalfFloat, MixedDevice, MixedTask};
use neural_arch::checkpoint::{load_safetensors, LoadOptions};
use neural_arch::dfdx::dtypes::{bf16, f16};
use neural_arch::dist::Shard;
use neural_arch::prelude::*;
use neural_arch::train::{ratios, MetricSums, Metrics, RunSummary, StepOutput, Task};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Read;
use std::path::Path;

/// Classes of Fashion-MNIST.
pub const CLASSES: usize = 10;
/// Side of a Fashion-MNIST image.
pub const SIDE: usize = 28;
/// Side of the model input (the CIFAR-shaped presets).
pub const INPUT: usize = 32;
/// Mean of Fashion-MNIST's training pixels, scaled to `[0, 1]`.
pub const MEAN: f32 = 0.2860;
/// Standard deviation of Fashion-MNIST's training pixels, scaled to `[0, 1]`.
pub const STD: f32 = 0.3530;
/// Training examples of the full data set (what `--epochs` counts in).
pub const TRAIN_EXAMPLES: usize = 60_000;

/// The class names, in label order.
pub const CLASS_NAMES: [&str; CLASSES] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The settings of a run that a resume keeps (see [`task_settings`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct Settings {
    eval_limit: Option<usize>,
}

/// Flags of the image trainers.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ImageArgs {
    /// The flags every trainer has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Evaluate on only the first N test images (all 10 000 by default), for speed.
    #[arg(long)]
    pub eval_limit: Option<usize>,
}

/// Labelled 28×28 grey images, as stored in the IDX files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Images {
    /// `len() · 28 · 28` pixels, row-major, 0 (black) to 255.
    pub pixels: Vec<u8>,
    /// The class of each image, in `0..10`.
    pub labels: Vec<u8>,
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * SIDE * SIDE..(i + 1) * SIDE * SIDE]
    }
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open {}; fetch the data set again with\n    python3 tools/fetch_data.py fashion-mnist --force",
            path.display()
        )
    })?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .with_context(|| {
            format!(
                "{} is not a readable gzip file; fetch the data set again with\n    \
                 python3 tools/fetch_data.py fashion-mnist --force",
                path.display()
            )
        })?;
    Ok(bytes)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses an IDX file of unsigned bytes with `dims` dimensions (magic `0x0000080{dims}`),
/// returning the dimensions and the data; `name` is the file named in errors.
pub fn parse_idx(bytes: &[u8], dims: usize, name: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let refetch =
        "fetch the data set again with\n    python3 tools/fetch_data.py fashion-mnist --force";
    let header = 4 + 4 * dims;
    ensure!(
        bytes.len() >= header,
        "{name}: truncated IDX file: {} bytes, shorter than the {header}-byte header; {refetch}",
        bytes.len()
    );
    let magic = be_u32(bytes, 0);
    let expected = 0x0800 | dims as u32;
    ensure!(
        magic == expected,
        "{name}: wrong magic number {magic:#010x}, expected {expected:#010x} (an IDX file of \
         unsigned bytes with {dims} dimension(s)); is it the right file, not damaged? {refetch}"
    );
    let shape: Vec<usize> = (0..dims)
        .map(|d| be_u32(bytes, 4 + 4 * d) as usize)
        .collect();
    // Checked: a damaged header may announce more bytes than a usize holds.
    let body = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    ensure!(
        body == Some(bytes.len() - header),
        "{name}: truncated or padded IDX file: the header announces {shape:?} = {} bytes of \
         data, the file holds {}; {refetch}",
        body.map_or_else(|| "too many".to_string(), |b| b.to_string()),
        bytes.len() - header
    );
    Ok((shape, bytes[header..].to_vec()))
}

/// Reads a pair of gzipped IDX files: `images` (`n`×28×28) and `labels` (`n`, each `< 10`).
pub fn read_idx_pair(images: &Path, labels: &Path) -> Result<Images> {
    let (ishape, pixels) = parse_idx(&read_gz(images)?, 3, &images.display().to_string())?;
    ensure!(
        ishape[1] == SIDE && ishape[2] == SIDE,
        "{}: images of {}×{} pixels, expected {SIDE}×{SIDE} (Fashion-MNIST)",
        images.display(),
        ishape[1],
        ishape[2]
    );
    let (lshape, labels_v) = parse_idx(&read_gz(labels)?, 1, &labels.display().to_string())?;
    ensure!(
        ishape[0] == lshape[0],
        "{} holds {} images but {} holds {} labels; the files do not belong together, fetch \
         the data set again with\n    python3 tools/fetch_data.py fashion-mnist --force",
        images.display(),
        ishape[0],
        labels.display(),
        lshape[0]
    );
    ensure!(ishape[0] > 0, "{} holds no images", images.display());
    if let Some((i, &l)) = labels_v
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= CLASSES)
    {
        bail!(
            "{}: label {l} of image {i} is not a class (0..{CLASSES}); fetch the data set again \
             with\n    python3 tools/fetch_data.py fashion-mnist --force",
            labels.display()
        );
    }
    Ok(Images {
        pixels,
        labels: labels_v,
    })
}

/// The training and test sets of Fashion-MNIST from the fetched directory (or an error that
/// prints the fetch command).
pub fn load_fashion_mnist() -> Result<(Images, Images)> {
    let dir = fetched("fashion-mnist")?;
    let train = read_idx_pair(
        &dir.join("train-images-idx3-ubyte.gz"),
        &dir.join("train-labels-idx1-ubyte.gz"),
    )?;
    let test = read_idx_pair(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
    )?;
    Ok((train, test))
}

/// Appends image `img` (28×28 bytes) to `out` as the normalised `[3, 32, 32]` input, placed at
/// offset `(dy, dx)` in the canvas (2, 2 is centred) and flipped left-right if `flip`.
pub fn preprocess_into(img: &[u8], dy: usize, dx: usize, flip: bool, out: &mut Vec<f32>) {
    let bg = (0.0 - MEAN) / STD;
    let mut plane = vec![bg; INPUT * INPUT];
    for r in 0..SIDE {
        for c in 0..SIDE {
            let src = if flip { SIDE - 1 - c } else { c };
            let v = img[r * SIDE + src] as f32 / 255.0;
            plane[(r + dy) * INPUT + c + dx] = (v - MEAN) / STD;
        }
    }
    for _ in 0..3 {
        out.extend_from_slice(&plane);
    }
}

type Batch<D, T> = Tensor<(usize, Const<3>, Const<INPUT>, Const<INPUT>), f32, D, T>;
type Logits<D, T> = Tensor<(usize, Const<CLASSES>), f32, D, T>;

/// The classification task of one run.
pub struct ImageTask<D: Device<f32>> {
    /// Training images.
    pub train: Images,
    /// Test images.
    pub test: Images,
    /// Images per training step.
    pub batch: usize,
    /// The run's seed.
    pub seed: u64,
    /// Random crops and flips of the training images.
    pub augment: bool,
    /// Test images per evaluation (the first ones).
    pub eval_limit: usize,
    /// Where tensors are made.
    pub dev: D,
    /// Which training image each stream position is.
    order: EpochOrder,
    /// This process's images of each batch (all of them outside a `--distributed` group).
    pub shard: Shard,
}

impl<D: Device<f32>> std::fmt::Debug for ImageTask<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ImageTask({} train images, {} test, batch {})",
            self.train.len(),
            self.test.len(),
            self.batch
        )
    }
}

impl<D: Device<f32>> ImageTask<D> {
    /// A task over `train` and `test`.
    pub fn new(
        train: Images,
        test: Images,
        batch: usize,
        seed: u64,
        augment: bool,
        eval_limit: usize,
        dev: D,
    ) -> Self {
        ImageTask {
            order: EpochOrder::new(train.len().max(1), seed, 0x4550_4f43_4800_0000),
            train,
            test,
            batch,
            seed,
            augment,
            eval_limit,
            dev,
            shard: Shard::SINGLE,
        }
    }

    /// The inputs (`[B, 3, 32, 32]`, flattened) and labels of this process's images of step
    /// `step`'s batch (all `B` of them outside a `--distributed` group).
    pub fn batch_at(&mut self, step: usize) -> Result<(Vec<f32>, Vec<usize>), ModelError> {
        let rows = self.shard.rows(self.batch)?;
        let mut x = Vec::with_capacity(rows.len() * 3 * INPUT * INPUT);
        let mut y = Vec::with_capacity(rows.len());
        for i in rows {
            let position = step * self.batch + i;
            let idx = self.order.at(position);
            let (dy, dx, flip) = if self.augment {
                let mut rng =
                    StdRng::seed_from_u64(mix(self.seed, 0x4155_4700_0000_0000, position as u64));
                let pad = INPUT - SIDE;
                (
                    rng.gen_range(0..=pad),
                    rng.gen_range(0..=pad),
                    rng.gen_bool(0.5),
                )
            } else {
                ((INPUT - SIDE) / 2, (INPUT - SIDE) / 2, false)
            };
            preprocess_into(self.train.image(idx), dy, dx, flip, &mut x);
            y.push(self.train.labels[idx] as usize);
        }
        Ok((x, y))
    }
}

impl<D, M> Task<M, f32, D> for ImageTask<D>
where
    D: Device<f32>,
    M: ModuleMut<
            Batch<D, OwnedTape<f32, D>>,
            Output = Logits<D, OwnedTape<f32, D>>,
            Error = ModelError,
        > + Module<Batch<D, NoneTape>, Output = Logits<D, NoneTape>, Error = ModelError>,
    ModelError: From<D::Err>,
{
    fn train_step(
        &mut self,
        model: &mut M,
        step: usize,
        grads: Gradients<f32, D>,
    ) -> Result<StepOutput<f32, D>, ModelError> {
        let (x, y) = self.batch_at(step)?;
        let x = self
            .dev
            .try_tensor_from_vec(x, (y.len(), Const, Const, Const))?;
        let logits = model.try_forward_mut(x.traced(grads))?;
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

    /// The test images split into `world` contiguous parts as equal as they come.
    fn evaluate_shard(
        &mut self,
        model: &mut M,
        shard: Shard,
    ) -> Result<Option<MetricSums>, ModelError> {
        let n = self.eval_limit.min(self.test.len());
        let std::ops::Range {
            start: first,
            end: last,
        } = shard.part(n);
        let chunk = self.batch.clamp(1, 256);
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let centre = (INPUT - SIDE) / 2;
        for start in (first..last).step_by(chunk) {
            let end = (start + chunk).min(last);
            let mut x = Vec::with_capacity((end - start) * 3 * INPUT * INPUT);
            for i in start..end {
                preprocess_into(self.test.image(i), centre, centre, false, &mut x);
            }
            let y: Vec<usize> = self.test.labels[start..end]
                .iter()
                .map(|&l| l as usize)
                .collect();
            let x = self
                .dev
                .try_tensor_from_vec(x, (y.len(), Const, Const, Const))?;
            let logits = model.try_forward(x)?;
            let rows = logits.as_vec();
            correct += rows
                .chunks_exact(CLASSES)
                .zip(&y)
                .filter(|(row, &label)| argmax(row) == label)
                .count();
            let loss = cross_entropy(logits, &y, Default::default())?;
            loss_sum += loss.as_vec()[0] as f64 * y.len() as f64;
        }
        let mine = (last - first) as f64;
        Ok(Some(MetricSums::from([
            ("eval_loss".to_string(), (loss_sum, mine)),
            ("accuracy".to_string(), (correct as f64, mine)),
        ])))
    }
}

impl<D, W, H> MixedTask<W, D, H> for ImageTask<D>
where
    H: HalfFloat,
    D: Device<f32> + Device<H>,
    W: ModuleMut<HalfBatch<D, H>, Output = HalfLogits<D, H>, Error = ModelError>,
    ModelError: From<<D as HasErr>::Err>,
{
    fn half_loss(
        &mut self,
        model: &mut W,
        step: usize,
        grads: Gradients<H, D>,
    ) -> Result<(Tensor<Rank0, H, D, OwnedTape<H, D>>, usize), ModelError> {
        let (x, y) = self.batch_at(step)?;
        let x = x.into_iter().map(H::from_single).collect();
        let x = self
            .dev
            .try_tensor_from_vec(x, (y.len(), Const, Const, Const))?;
        let logits = model.try_forward_mut(x.traced(grads))?;
        Ok((cross_entropy(logits, &y, Default::default())?, y.len()))
    }
}

/// A picture drawn from the trained model and the test images into the run's directory.
pub type Picture<M> = dyn Fn(&M, &Images, &Path) -> Result<()>;

/// An image classifier's working copy in the half type `H`, for mixed precision.
pub trait ImageWork<D: MixedDevice<H>, H: HalfFloat>:
    TensorCollection<f32, D, To<H, D> = Self::Work>
{
    /// The working copy's type.
    type Work: TensorCollection<H, D>
        + ZeroGrads<H, D>
        + ModuleMut<HalfBatch<D, H>, Output = HalfLogits<D, H>, Error = ModelError>;
}

impl<D: MixedDevice<H>, H: HalfFloat, M, W> ImageWork<D, H> for M
where
    M: TensorCollection<f32, D, To<H, D> = W>,
    W: TensorCollection<H, D>
        + ZeroGrads<H, D>
        + ModuleMut<HalfBatch<D, H>, Output = HalfLogits<D, H>, Error = ModelError>,
{
    type Work = W;
}

/// The bounds an image classifier `Built<B, f32, D>` meets for [`run`] on device `D`:
/// training and evaluation in `f32`, training in mixed precision on its `f16` or `bf16` copy,
/// and a copy on the CPU for the pictures.
pub trait ImageModel<D: HalfDevice>:
    ImageWork<D, f16>
    + ImageWork<D, bf16>
    + ZeroGrads<f32, D>
    + NumParams<f32, D>
    + ModuleMut<
        Batch<D, OwnedTape<f32, D>>,
        Output = Logits<D, OwnedTape<f32, D>>,
        Error = ModelError,
    > + Module<Batch<D, NoneTape>, Output = Logits<D, NoneTape>, Error = ModelError>
{
}

impl<D: HalfDevice, M> ImageModel<D> for M where
    M: ImageWork<D, f16>
        + ImageWork<D, bf16>
        + ZeroGrads<f32, D>
        + NumParams<f32, D>
        + ModuleMut<
            Batch<D, OwnedTape<f32, D>>,
            Output = Logits<D, OwnedTape<f32, D>>,
            Error = ModelError,
        > + Module<Batch<D, NoneTape>, Output = Logits<D, NoneTape>, Error = ModelError>
{
}

type HalfBatch<D, H> = Tensor<(usize, Const<3>, Const<INPUT>, Const<INPUT>), H, D, OwnedTape<H, D>>;
type HalfLogits<D, H> = Tensor<(usize, Const<CLASSES>), H, D, OwnedTape<H, D>>;

/// Trains (or, with `--eval-only`, evaluates) the image classifier `B`, on the CPU or, with
/// `--device cuda` in a build with the `cuda` feature, on a GPU. `init` sets the fresh weights
/// by name (none: the layers' defaults); `augment` turns on random crops and flips; `picture`,
/// if any, is drawn at the end from a CPU copy of the model.
pub fn run<B>(
    arch: &str,
    args: &ImageArgs,
    defaults: &Defaults,
    load_options: LoadOptions,
    init: Option<&InitRule>,
    augment: bool,
    picture: Option<&Picture<Built<B, f32, Cpu>>>,
) -> Result<RunSummary>
where
    B: BuildOnDevice<Cpu, f32> + ImagesOnCuda,
    Built<B, f32, Cpu>: ImageModel<Cpu>,
{
    let c = &args.common;
    let run = Run {
        arch,
        args,
        defaults,
        load_options,
        init,
        augment,
        picture,
    };
    match c.device_choice()? {
        DeviceChoice::Cpu => run_on::<B, Cpu>(Cpu::seed_from_u64(c.seed), run),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => B::run_cuda(n, run),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => unreachable!("device_choice refuses CUDA in a build without it"),
    }
}

/// The arguments of [`run`].
pub struct Run<'a, M> {
    arch: &'a str,
    args: &'a ImageArgs,
    defaults: &'a Defaults,
    load_options: LoadOptions,
    init: Option<&'a InitRule>,
    augment: bool,
    picture: Option<&'a Picture<M>>,
}

/// An image classifier that also trains on CUDA, in a build with the `cuda` feature (a bound
/// every model meets in a build without it); see `lm::OnCuda`.
pub trait ImagesOnCuda: BuildOnDevice<Cpu, f32> {
    /// [`run`] on CUDA device `ordinal`.
    #[cfg(feature = "cuda")]
    fn run_cuda(ordinal: usize, run: Run<'_, Built<Self, f32, Cpu>>) -> Result<RunSummary>;
}

#[cfg(not(feature = "cuda"))]
impl<B: BuildOnDevice<Cpu, f32>> ImagesOnCuda for B {}

#[cfg(feature = "cuda")]
impl<B> ImagesOnCuda for B
where
    B: BuildOnDevice<Cpu, f32> + BuildOnDevice<Cuda, f32>,
    Built<B, f32, Cuda>:
        ImageModel<Cuda> + TensorCollection<f32, Cuda, To<f32, Cpu> = Built<B, f32, Cpu>>,
{
    fn run_cuda(ordinal: usize, run: Run<'_, Built<B, f32, Cpu>>) -> Result<RunSummary> {
        let c = &run.args.common;
        let dev = crate::cli::cuda_device(c, ordinal)?;
        run_on::<B, Cuda>(dev, run)
    }
}

fn run_on<B, D>(dev: D, run: Run<'_, Built<B, f32, Cpu>>) -> Result<RunSummary>
where
    D: HalfDevice + DeviceBuildExt,
    B: BuildOnDevice<D, f32> + BuildOnDevice<Cpu, f32>,
    Built<B, f32, D>: ImageModel<D> + TensorCollection<f32, D, To<f32, Cpu> = Built<B, f32, Cpu>>,
    ModelError: From<<D as HasErr>::Err>,
{
    let Run {
        arch,
        args,
        defaults,
        load_options,
        init,
        augment,
        picture,
    } = run;
    let c = &args.common;
    c.apply_recompute(arch, false)?;
    let mut model = dev.try_build_module::<B, f32>().map_err(ModelError::from)?;
    if let Some(rule) = init {
        neural_arch::init::init_weights(&mut model, c.seed, rule)?;
    }
    if let Some(path) = &c.init_from {
        load_safetensors(&mut model, path, &load_options)
            .with_context(|| format!("cannot start from {}", path.display()))?;
    }
    let settings = task_settings(
        c,
        Settings {
            eval_limit: args.eval_limit,
        },
    )?;
    let mut config = run_config(c, arch, defaults, model.num_trainable_params(), &settings)?;
    let (train, test) = load_fashion_mnist()?;
    apply_epochs(c, &mut config, train.len())?;
    let eval_limit = settings.eval_limit.unwrap_or(test.len());
    ensure!(eval_limit >= 1, "--eval-limit must be at least 1");
    let shard = c.shard()?;
    if shard.is_root() {
        println!(
        "{arch} {}: {} parameters; Fashion-MNIST: {} training and {} test images (evaluating on {}){}",
        c.preset,
        model.num_trainable_params(),
        train.len(),
        test.len(),
        eval_limit.min(test.len()),
        if augment { "; random crops and flips" } else { "" }
    );
    }
    let mut task = ImageTask::new(
        train,
        test,
        config.batch_size,
        config.seed,
        augment,
        eval_limit,
        dev.clone(),
    );
    task.shard = shard;
    let out = config.out.clone();
    // A resumed run keeps the element type it started with.
    let summary = match config.dtype.as_str() {
        "f16" => train_or_evaluate_mixed::<f16, _, _, _>(c, config, &mut task, &mut model, 0.05)?,
        "bf16" => train_or_evaluate_mixed::<bf16, _, _, _>(c, config, &mut task, &mut model, 0.05)?,
        _ => train_or_evaluate(c, config, &mut task, &mut model, 0.05)?,
    };
    if let (Some(draw), true) = (picture, task.shard.is_root()) {
        let on_cpu = model
            .try_to_device(&Cpu::default())
            .map_err(|e| ModelError::Config(format!("cannot copy the model to the CPU: {e:?}")))?;
        draw(&on_cpu, &task.test, &out)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn idx_headers_are_checked() {
        let ok = idx(0x801, &[3], &[1, 2, 3]);
        assert_eq!(parse_idx(&ok, 1, "f").unwrap(), (vec![3], vec![1, 2, 3]));
        let e = parse_idx(&idx(0x803, &[3], &[1, 2, 3]), 1, "lbl").unwrap_err();
        assert!(e.to_string().contains("lbl: wrong magic number"), "{e}");
        let e = parse_idx(&idx(0x801, &[4], &[1, 2, 3]), 1, "lbl").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let huge = idx(0x803, &[u32::MAX, u32::MAX, u32::MAX], &[0]);
        let e = parse_idx(&huge, 3, "img").unwrap_err();
        assert!(e.to_string().contains("too many"), "{e}");
        let e = parse_idx(&[0, 0, 8], 1, "lbl").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn preprocessing_pads_repeats_and_normalises() {
        let img = vec![255u8; SIDE * SIDE];
        let mut out = Vec::new();
        preprocess_into(&img, 2, 2, false, &mut out);
        assert_eq!(out.len(), 3 * INPUT * INPUT);
        let bg = -MEAN / STD;
        let fg = (1.0 - MEAN) / STD;
        assert!((out[0] - bg).abs() < 1e-6 && (out[2 * INPUT + 2] - fg).abs() < 1e-6);
        assert_eq!(out[..INPUT * INPUT], out[2 * INPUT * INPUT..]);
        let mut row = vec![0u8; SIDE * SIDE];
        row[0] = 255;
        let mut flipped = Vec::new();
        preprocess_into(&row, 0, 0, true, &mut flipped);
        assert!((flipped[SIDE - 1] - fg).abs() < 1e-6);
    }

    #[test]
    fn batches_are_a_function_of_seed_and_step() {
        let n = 10;
        let data = Images {
            pixels: (0..n * SIDE * SIDE)
                .map(|i| (i / (SIDE * SIDE)) as u8)
                .collect(),
            labels: (0..n as u8).collect(),
        };
        let mk = || ImageTask::new(data.clone(), data.clone(), 4, 7, true, 10, Cpu::default());
        let (mut a, mut b) = (mk(), mk());
        let later = a.batch_at(5).unwrap();
        for s in 0..5 {
            b.batch_at(s).unwrap();
        }
        assert_eq!(later, b.batch_at(5).unwrap());
        // One epoch (steps 0, 1 and half of 2) sees every image once.
        let mut seen: Vec<usize> = (0..3)
            .flat_map(|s| a.batch_at(s).unwrap().1)
            .take(n)
            .collect();
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        // Two ranks split each batch into halves.
        let mut halves = [mk(), mk()];
        for (rank, h) in halves.iter_mut().enumerate() {
            h.shard = Shard { rank, world: 2 };
        }
        let (x0, y0) = halves[0].batch_at(5).unwrap();
        let (x1, y1) = halves[1].batch_at(5).unwrap();
        assert_eq!([y0, y1].concat(), later.1);
        assert_eq!([x0, x1].concat(), later.0);
    }
}
