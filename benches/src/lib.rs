//! Benchmarks of neural-arch against PyTorch eager on the same machine.
//!
//! - `benches/ops.rs` (criterion): the operation table (matmul, conv2d, multi-head attention,
//!   layer norm, GELU, softmax, embedding lookup), forward and forward + backward.
//! - `benches/training_step.rs` (criterion): one training step of each of the six tiny presets,
//!   built by [`presets`] here.
//! - `pytorch/bench.py`: the same rows in PyTorch; `report.py` runs both sides at 1 and 2
//!   threads, the whole-run trainer comparison, and writes `report.md` with a bar chart.
//!
//! Weights start as the trainers start them. A training step is what the trainers run (`neural_arch::train::Trainer`): zero the
//! gradients, forward in training mode, loss, backward, clip the gradient norm to 1, AdamW with
//! the trainer's weight decay. The batch is drawn once from a seeded generator, with the
//! trainers' default sizes, and reused: data loading is the whole-run comparison's business.

use neural_arch::init::{init_weights, transformer_rule, Init};
use neural_arch::prelude::*;
use neural_arch_models::bert::{BertTiny, IGNORE_INDEX};
use neural_arch_models::clip::ClipTiny;
use neural_arch_models::gpt2::{self, Gpt2Tiny};
use neural_arch_models::llama::{self, LlamaTiny};
use neural_arch_models::resnet::ResNetTiny;
use neural_arch_models::vit::VitTiny;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The trainers' allocator, told by `.cargo/config.toml` to keep freed memory (see
/// `examples/Cargo.toml`): a step here costs what it costs in a trainer.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The loss of one forward pass, still on its tape.
pub type Loss = Tensor<Rank0, f32, Cpu, OwnedTape<f32, Cpu>>;

/// One preset's training step, ready to run again and again.
pub trait TrainStep {
    /// The preset's name in the report (`gpt2`, `bert`, ...).
    fn name(&self) -> &'static str;
    /// What one step processes, for throughput: `(count, unit)`, e.g. `(2048, "tokens")`.
    fn items(&self) -> (usize, &'static str);
    /// Runs one whole step and returns its loss.
    fn step(&mut self) -> Result<f64, ModelError>;
}

/// A model, its optimizer and gradients, and the forward pass of its batch.
struct Stepper<M, F> {
    name: &'static str,
    items: (usize, &'static str),
    model: M,
    opt: Adam<M, f32, Cpu>,
    grads: Option<Gradients<f32, Cpu>>,
    forward: F,
}

impl<M, F> TrainStep for Stepper<M, F>
where
    M: TensorCollection<f32, Cpu> + ZeroGrads<f32, Cpu>,
    F: FnMut(&mut M, Gradients<f32, Cpu>) -> Result<Loss, ModelError>,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn items(&self) -> (usize, &'static str) {
        self.items
    }

    fn step(&mut self) -> Result<f64, ModelError> {
        let mut g = match self.grads.take() {
            Some(g) => g,
            None => self.model.try_alloc_grads()?,
        };
        self.model.try_zero_grads(&mut g)?;
        let loss = (self.forward)(&mut self.model, g)?;
        let value = loss.array() as f64;
        let mut g = loss.backward();
        clip_grad_norm(&mut g, &self.model, 1.0)?;
        self.opt.step(&mut self.model, &mut g)?;
        self.grads = Some(g);
        Ok(value)
    }
}

fn stepper<M, F>(
    name: &'static str,
    items: (usize, &'static str),
    model: M,
    lr: f64,
    weight_decay: f64,
    forward: F,
) -> Box<dyn TrainStep>
where
    M: TensorCollection<f32, Cpu> + ZeroGrads<f32, Cpu> + 'static,
    F: FnMut(&mut M, Gradients<f32, Cpu>) -> Result<Loss, ModelError> + 'static,
{
    let opt = Adam::new(&model, adamw(lr, weight_decay));
    Box::new(Stepper {
        name,
        items,
        model,
        opt,
        grads: None,
        forward,
    })
}

/// `model` with the weights its trainer starts from (`rule`, seed 0). dfdx's default
/// initialisation gives GPT-2's tied unembedding logits in the hundreds: the loss starts
/// near 100, and the underflowing exponentials make the first steps 30 times slower.
fn initialised<M: TensorCollection<f32, Cpu>>(
    mut model: M,
    rule: impl Fn(&str, &[usize]) -> Init,
) -> M {
    init_weights(&mut model, 0, rule).expect("initialising the weights");
    model
}

/// Sequences per batch and tokens per sequence of `train-gpt2` and `train-llama`.
pub const LM_BATCH: (usize, usize) = (16, 128);
/// Sequences per batch and tokens per sequence of `train-bert --task mlm`.
pub const BERT_BATCH: (usize, usize) = (32, 64);
/// Images per batch of `train-vit` and `train-resnet`.
pub const IMAGE_BATCH: usize = 64;
/// Pairs per batch of `train-clip`, and caption tokens (its captions pad to the longest in
/// the batch; 16 covers two-object scenes).
pub const CLIP_BATCH: (usize, usize) = (96, 16);
/// The share of BERT's tokens that carry a masked-LM label (BERT's 15 %).
pub const BERT_MASKED: f64 = 0.15;

/// The six tiny presets' training steps, in the report's order, on `dev`.
pub fn presets(dev: &Cpu) -> Vec<Box<dyn TrainStep>> {
    vec![
        gpt2(dev),
        llama(dev),
        bert(dev),
        vit(dev),
        resnet(dev),
        clip(dev),
    ]
}

/// `n` ids below `vocab` from a generator seeded with `seed`.
pub fn ids(n: usize, vocab: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab)).collect()
}

/// `n` standard-normal-ish values (uniform, variance 1) from a generator seeded with `seed`.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.732f32..1.732)).collect()
}

/// GPT-2 tiny, next-token cross-entropy on 16 × 128 tokens; AdamW lr 1e-3, weight decay 0.1.
pub fn gpt2(dev: &Cpu) -> Box<dyn TrainStep> {
    let (b, t) = LM_BATCH;
    let x = dev.tensor_from_vec(ids(b * t, 8000, 1), (b, t));
    let y = ids(b * t, 8000, 2);
    let model = initialised(dev.build_module::<Gpt2Tiny, f32>(), gpt2::init_rule(4));
    stepper("gpt2", (b * t, "tokens"), model, 1e-3, 0.1, move |m, g| {
        let logits = m.try_forward_mut(x.clone().traced(g))?;
        cross_entropy(logits, &y, Default::default())
    })
}

/// Llama tiny, next-token cross-entropy on 16 × 128 tokens; AdamW lr 1e-3, weight decay 0.1.
pub fn llama(dev: &Cpu) -> Box<dyn TrainStep> {
    let (b, t) = LM_BATCH;
    let x = dev.tensor_from_vec(ids(b * t, 8000, 1), (b, t));
    let y = ids(b * t, 8000, 2);
    let model = initialised(dev.build_module::<LlamaTiny, f32>(), llama::init_rule());
    stepper("llama", (b * t, "tokens"), model, 1e-3, 0.1, move |m, g| {
        let logits = m.try_forward_mut(x.clone().traced(g))?;
        cross_entropy(logits, &y, Default::default())
    })
}

/// The masked positions of BERT's batch: every token with probability [`BERT_MASKED`], drawn
/// from `seed`; at least one.
pub fn bert_masked(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at: Vec<usize> = (0..n).filter(|_| rng.gen_bool(BERT_MASKED)).collect();
    if at.is_empty() {
        at.push(0);
    }
    at
}

/// BERT tiny, masked-LM cross-entropy at the masked 15 % of 32 × 64 tokens (the head runs at
/// those positions only, as in `train-bert`); no padding; AdamW lr 1e-3, weight decay 0.01.
pub fn bert(dev: &Cpu) -> Box<dyn TrainStep> {
    const WIDTH: usize = 128;
    let (b, t) = BERT_BATCH;
    let x = dev.tensor_from_vec(ids(b * t, 8000, 1), (b, t));
    let mask = dev.tensor_from_vec(vec![true; b * t], (b, t));
    let types = dev.tensor_from_vec(vec![0usize; b * t], (b, t));
    let at = bert_masked(b * t, 3);
    let targets = ids(at.len(), 8000, 2);
    debug_assert!(targets.iter().all(|&y| y as i64 != IGNORE_INDEX));
    let idx = dev.tensor_from_vec(at.clone(), (at.len(),));
    let model = initialised(dev.build_module::<BertTiny, f32>(), transformer_rule(0.02));
    stepper("bert", (b * t, "tokens"), model, 1e-3, 0.01, move |m, g| {
        let types = types.clone().put_tape(OwnedTape::default());
        let hidden = m
            .bert
            .try_forward_mut((x.clone().traced(g), mask.clone(), types))?;
        let flat = hidden.try_reshape_like(&(b * t, Const::<WIDTH>))?;
        let picked =
            flat.try_gather(idx.clone())?
                .try_reshape_like(&(1usize, at.len(), Const::<WIDTH>))?;
        let h = m.cls.try_forward(picked)?;
        let logits = m.cls.add_bias(m.bert.unembed(h)?)?;
        cross_entropy(logits, &targets, Default::default())
    })
}

/// A batch of images, `[B, 3, 32, 32]`.
pub type Images = Tensor<(usize, Const<3>, Const<32>, Const<32>), f32, Cpu>;

fn images(dev: &Cpu) -> (Images, Vec<usize>) {
    let b = IMAGE_BATCH;
    let x = dev.tensor_from_vec(values(b * 3 * 32 * 32, 1), (b, Const, Const, Const));
    (x, ids(b, 10, 2))
}

/// ViT tiny, cross-entropy over 10 classes of 64 images 3 × 32 × 32; AdamW lr 1e-3, weight
/// decay 0.05.
pub fn vit(dev: &Cpu) -> Box<dyn TrainStep> {
    let (x, y) = images(dev);
    let model = initialised(dev.build_module::<VitTiny, f32>(), transformer_rule(0.02));
    stepper(
        "vit",
        (IMAGE_BATCH, "images"),
        model,
        1e-3,
        0.05,
        move |m, g| {
            let logits = m.try_forward_mut(x.clone().traced(g))?;
            cross_entropy(logits, &y, Default::default())
        },
    )
}

/// ResNet tiny (batch norm in training mode; dfdx's initialisation, as `train-resnet`),
/// cross-entropy over 10 classes of 64 images 3 × 32 × 32; AdamW lr 2e-3, weight decay 0.05.
pub fn resnet(dev: &Cpu) -> Box<dyn TrainStep> {
    let (x, y) = images(dev);
    let model = dev.build_module::<ResNetTiny, f32>();
    stepper(
        "resnet",
        (IMAGE_BATCH, "images"),
        model,
        2e-3,
        0.05,
        move |m, g| {
            let logits = m.try_forward_mut(x.clone().traced(g))?;
            cross_entropy(logits, &y, Default::default())
        },
    )
}

/// CLIP tiny, the symmetric contrastive loss of 96 caption-image pairs (captions of 16 tokens,
/// the last one the end token 7999; images 3 × 32 × 32); AdamW lr 5e-4, weight decay 0.1.
pub fn clip(dev: &Cpu) -> Box<dyn TrainStep> {
    let (b, t) = CLIP_BATCH;
    let mut text = ids(b * t, 7999, 1);
    for row in text.chunks_mut(t) {
        row[t - 1] = 7999;
    }
    let text = dev.tensor_from_vec(text, (b, t));
    let px = dev.tensor_from_vec(values(b * 3 * 32 * 32, 2), (b, Const, Const, Const));
    let model = initialised(dev.build_module::<ClipTiny, f32>(), transformer_rule(0.02));
    stepper("clip", (b, "pairs"), model, 5e-4, 0.1, move |m, g| {
        let (text, image) = m.try_forward((text.clone().traced(g), px.clone().leaky_traced()))?;
        clip_loss(image, text, &m.logit_scale)
    })
}
