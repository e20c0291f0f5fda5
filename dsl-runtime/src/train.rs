//! One training loop for every model: learning-rate schedule, gradient clipping, evaluation,
//! metrics, progress, checkpoints with exact resume, and the run summary.
//!
//! A model and its data come in as a [`Task`]: the task turns a step number into a batch, runs
//! the forward pass and the loss, and evaluates. Everything else is here, once:
//!
//! - `DIR/metrics.jsonl`: one JSON object per step (`step`, `loss`, `lr`, `grad_norm`,
//!   `items_per_sec`) and per evaluation (`step` and the task's metrics);
//! - `DIR/checkpoint/`: `model.safetensors`, `optimizer.safetensors` and `state.json` (model,
//!   preset, parameters, step, seed, configuration), replaced as a whole by a rename, so a
//!   crash leaves the previous checkpoint intact;
//! - `DIR/summary.json` at the end (see [`RunSummary`]).
//!
//! Batches are a function of the seed and the step (the task's contract), so a resumed run
//! sees the same batches as an uninterrupted one, and with the model, the optimizer state and
//! the step restored its metrics are the same, line for line. Ctrl-C finishes the current step,
//! writes a checkpoint and stops.

use crate::amp::{mixed_step, GradScaler, HalfFloat, MixedDevice, MixedTask};
use crate::checkpoint::{
    load_safetensors, save_safetensors, write_atomically, CheckpointElem, LoadOptions,
};
use crate::dist::{average_gradients, broadcast_model, Collective, Shard};
use crate::optim::{clip_grad_norm, Optim, OptimizerState, WarmupCosine};
use crate::Error;
use dfdx::nn::{TensorCollection, ZeroGrads};
use dfdx::shapes::Dtype;
use dfdx::tensor::safetensors::SafeDtype;
use dfdx::tensor::{Gradients, HasErr};
use dfdx::tensor_ops::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Metrics by name (`eval_loss`, `accuracy`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// Metrics as the ranks of a group add them up: by name, a weighted sum over this rank's
/// held-out examples and the sum of the weights (`eval_loss`: the summed loss of the tokens
/// and their number). The metric is the ratio of the sums over all ranks ([`ratios`]).
pub type MetricSums = BTreeMap<String, (f64, f64)>;

/// Each metric of `sums` as its sum over its weight (NaN for no weight).
pub fn ratios(sums: &MetricSums) -> Metrics {
    sums.iter()
        .map(|(k, &(sum, weight))| {
            let v = if weight > 0.0 { sum / weight } else { f64::NAN };
            (k.clone(), v)
        })
        .collect()
}

/// What one training step computed.
#[derive(Debug)]
pub struct StepOutput<E: Dtype, D: Device<E>> {
    /// The mean loss of the batch.
    pub loss: f64,
    /// The gradients of that loss.
    pub grads: Gradients<E, D>,
    /// Items the batch held (tokens or images), for the throughput.
    pub items: usize,
}

/// A model's training data and objective, as the [`Trainer`] drives them.
pub trait Task<M, E: Dtype, D: Device<E>> {
    /// Runs the training batch of step `step` (a pure function of the run's seed and `step`):
    /// forward pass in training mode on a tape from `grads`, loss, backward.
    fn train_step(
        &mut self,
        model: &mut M,
        step: usize,
        grads: Gradients<E, D>,
    ) -> Result<StepOutput<E, D>, Error>;

    /// Evaluates on held-out data; the keys become the metrics' names (`eval_loss`, ...).
    fn evaluate(&mut self, model: &mut M) -> Result<Metrics, Error>;

    /// This rank's share of [`evaluate`](Self::evaluate) in a data-parallel group, for a task
    /// whose metrics are means over held-out examples: the sums and weights of `shard`'s part
    /// of them. Every rank of the group evaluates its part, the trainer adds the parts up, and
    /// the metrics are the ratios: the held-out set is evaluated once, `world` times faster.
    /// `None` (the default, for metrics that need every example at once, such as retrieval
    /// among all captions): rank 0 evaluates alone with `evaluate`.
    fn evaluate_shard(&mut self, model: &mut M, shard: Shard) -> Result<Option<MetricSums>, Error> {
        let _ = (model, shard);
        Ok(None)
    }

    /// Runs after each optimizer step, before anything reads the weights (evaluation, a
    /// checkpoint, the next step): where a task keeps a parameter inside its bounds, as CLIP
    /// clamps its temperature. Nothing by default.
    fn after_step(&mut self, model: &mut M) -> Result<(), Error> {
        let _ = model;
        Ok(())
    }

    /// Lines to print after an evaluation, such as generated text. None by default.
    fn samples(&mut self, model: &mut M) -> Result<Vec<String>, Error> {
        let _ = model;
        Ok(Vec::new())
    }
}

/// The settings of a run; stored in the checkpoint so that a resume can check them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Architecture name (`gpt2`), recorded and checked on resume.
    pub model: String,
    /// Preset name (`tiny`), recorded and checked on resume.
    pub preset: String,
    /// Optimizer steps in all (a resumed run continues to this number).
    pub steps: usize,
    /// Examples per step, as recorded in the summary.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// Clip the gradient's global norm to this (none when `None`).
    pub grad_clip: Option<f64>,
    /// Evaluate every this many steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (and at the end); 0 = only at the end.
    pub checkpoint_every: usize,
    /// The seed of the data order and the initialisation.
    pub seed: u64,
    /// `cpu`, `cuda`, ..., as recorded in the summary.
    pub device: String,
    /// `f32`, ..., as recorded in the summary.
    pub dtype: String,
    /// What the items are: `tokens` or `images`.
    pub unit: String,
    /// The output directory.
    pub out: PathBuf,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Stop after this step, with a checkpoint, as Ctrl-C would (a time-sliced job resumes
    /// later with `--resume`); `None` runs to `steps`.
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// The task's own settings (a binary's flags beyond these, such as the context length),
    /// stored with the checkpoint so that a resumed run rebuilds the same task. `null` when
    /// the task has none.
    #[serde(default)]
    pub task: serde_json::Value,
}

/// What `state.json` of a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Architecture name.
    pub model: String,
    /// Preset name.
    pub preset: String,
    /// Trainable parameters.
    pub params: usize,
    /// Steps done.
    pub step: usize,
    /// The run's seed; with `step`, it fixes the position in the data.
    pub seed: u64,
    /// The run's settings.
    pub config: TrainConfig,
    /// The loss scaler's state, in a mixed-precision run.
    #[serde(default)]
    pub scaler: Option<GradScaler>,
}

/// The end of a run, written to `DIR/summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Architecture name.
    pub model: String,
    /// Preset name.
    pub preset: String,
    /// Trainable parameters.
    pub params: usize,
    /// Steps done.
    pub steps: usize,
    /// Mean training loss over the last (up to) 20 steps.
    pub train_loss: f64,
    /// The last evaluation's metrics (`eval_loss`, accuracies, ...).
    pub eval: Metrics,
    /// Throughput over the steps of this process: tokens or images per second.
    pub items_per_sec: f64,
    /// What the items are (`tokens`, `images`).
    pub unit: String,
    /// Peak resident memory of the process, in bytes (`VmHWM`; 0 where unknown).
    pub peak_rss_bytes: u64,
    /// Resident memory when training started, in bytes (`VmRSS`; 0 where unknown): the
    /// runtime, the data and the weights, before gradients, optimizer state and activations.
    /// The benches' memory breakdown is the difference to the peak.
    #[serde(default)]
    pub rss_at_start_bytes: u64,
    /// Peak memory of the device, in bytes: on the CPU the peak resident memory; on CUDA the
    /// most device memory in use after a step (`cuMemGetInfo`: every context on the GPU, and
    /// dfdx's cache of freed buffers, which keeps the step's high-water mark).
    #[serde(default)]
    pub peak_device_memory_bytes: u64,
    /// Steps skipped because their gradients overflowed (mixed precision; 0 otherwise).
    #[serde(default)]
    pub skipped_steps: usize,
    /// The loss scale at the end (mixed precision; `None` otherwise).
    #[serde(default)]
    pub loss_scale: Option<f64>,
    /// Device, as configured.
    pub device: String,
    /// Element type, as configured.
    pub dtype: String,
    /// Wall-clock seconds of this process's part of the run.
    pub wall_seconds: f64,
    /// Whether Ctrl-C stopped the run early (a checkpoint was written).
    pub interrupted: bool,
}

impl RunSummary {
    /// The summary as JSON, with `tokens_per_sec` or `images_per_sec` named after the unit.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.insert(
                format!("{}_per_sec", self.unit),
                serde_json::json!(self.items_per_sec),
            );
            for (k, val) in &self.eval {
                map.insert(k.clone(), serde_json::json!(val));
            }
        }
        v
    }
}

/// Peak resident memory of this process in bytes, from `/proc/self/status` (0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident memory of this process now, in bytes, from `/proc/self/status` (0 elsewhere).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("{}: {e}", path.display()))
}

/// Reads a checkpoint's `state.json` and checks it is one of `config`'s model and preset.
pub fn read_checkpoint_state(
    dir: &Path,
    config: &TrainConfig,
    params: usize,
) -> Result<CheckpointState, Error> {
    let path = dir.join("checkpoint").join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::Checkpoint(format!(
            "cannot resume from {}: {e}; is it the --out directory of an earlier run?",
            path.display()
        ))
    })?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| {
        io_error(
            &path,
            format!("not a checkpoint state ({e}); the file is damaged"),
        )
    })?;
    if state.model != config.model || state.preset != config.preset || state.params != params {
        return Err(Error::Checkpoint(format!(
            "{} is a checkpoint of {} preset `{}` ({} parameters), but this run trains {} preset \
             `{}` ({} parameters); resume with the same model and preset, or start a new run \
             with another --out",
            dir.display(),
            state.model,
            state.preset,
            state.params,
            config.model,
            config.preset,
            params
        )));
    }
    Ok(state)
}

/// The training loop. Build it with a configuration, then [`run`](Trainer::run) a task.
pub struct Trainer {
    config: TrainConfig,
    stop: Arc<AtomicBool>,
    group: Option<Rc<dyn Collective>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .finish()
    }
}

impl Trainer {
    /// A trainer for `config`, after checking its values.
    pub fn new(config: TrainConfig) -> Result<Self, Error> {
        if config.steps == 0 {
            return Err(Error::Config("--steps must be at least 1".into()));
        }
        if !(config.lr.is_finite() && config.lr > 0.0) {
            return Err(Error::Config(format!(
                "--lr must be a positive number, got {}",
                config.lr
            )));
        }
        if let Some(c) = config.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::Config(format!(
                    "the gradient clip must be positive, got {c}"
                )));
            }
        }
        Ok(Trainer {
            config,
            stop: Arc::new(AtomicBool::new(false)),
            group: None,
        })
    }

    /// Trains data-parallel in `group` (see [`crate::dist`]): this process is one of the
    /// group's ranks. The task must draw this rank's shard of each global batch
    /// (`config.batch_size` examples in all); the trainer broadcasts rank 0's weights before
    /// the first step, averages the gradients before each optimizer step, and sums the items
    /// and averages the losses it reports. A task that evaluates in shards
    /// ([`Task::evaluate_shard`]) is evaluated by every rank, each on its part; otherwise rank 0
    /// evaluates alone and the others wait for it in the next step's all-reduce. Only rank 0
    /// writes files (metrics, checkpoints, summary). A resumed
    /// run reads the checkpoint on every rank, so the output directory must be one they all
    /// see (shared storage across machines).
    pub fn with_group(mut self, group: Rc<dyn Collective>) -> Self {
        self.group = Some(group);
        self
    }

    /// This process's place in its group ([`Shard::SINGLE`] without one).
    pub fn shard(&self) -> Shard {
        self.group.as_ref().map_or(Shard::SINGLE, |g| g.shard())
    }

    /// Makes Ctrl-C, and on Unix SIGUSR1, stop the run after the current step, with a
    /// checkpoint. Only the first call in a process installs the Ctrl-C handler; every call
    /// registers its trainer's flag for SIGUSR1.
    ///
    /// SIGUSR1 is the graceful stop of a `--distributed` group: `mpirun` answers Ctrl-C by
    /// killing the ranks, but forwards SIGUSR1 to all of them (`kill -USR1 <mpirun's pid>`),
    /// and the ranks agree on stopping at the same step.
    pub fn stop_on_ctrl_c(&self) {
        let flag = self.stop.clone();
        // A second handler cannot be installed; the first one keeps working for its trainer.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
        #[cfg(unix)]
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, self.stop.clone())
        {
            eprintln!("warning: SIGUSR1 will not stop the run: {e}");
        }
    }

    /// A flag that, once set, stops the run after the current step with a checkpoint (what
    /// Ctrl-C sets).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Trains `model` with `opt` on `task`, from scratch or, with `resume`, from the checkpoint
    /// in the output directory.
    pub fn run<M, E, D, O, T>(
        &self,
        task: &mut T,
        model: &mut M,
        opt: &mut O,
        resume: bool,
    ) -> Result<RunSummary, Error>
    where
        E: Dtype + CheckpointElem + SafeDtype,
        D: Device<E>,
        M: TensorCollection<E, D> + ZeroGrads<E, D> + dfdx::nn::NumParams<E, D>,
        O: Optim<M, E, D>,
        T: Task<M, E, D>,
        Error: From<D::Err>,
    {
        self.run_in(task, model, opt, resume, &mut Plain)
    }

    /// [`run`](Self::run) in mixed precision: `model` holds the `f32` master weights that `opt`
    /// updates and checkpoints save; each step's forward and backward passes run on `work`,
    /// its working copy in the half type `H`, `f16` or `bf16` (`model.to_dtype::<H>()`, with
    /// the same layer settings, such as an RMSNorm's `eps`), refreshed from `model` at every
    /// step, through
    /// [`MixedTask::half_loss`], with dynamic loss scaling (see [`crate::amp`]).
    /// Steps whose gradients overflow are skipped: the metrics mark them (`"skipped": true`,
    /// with the `loss_scale` of every step) and the summary counts them. Evaluation runs on
    /// the master weights. `scaler` is the scaling to start from (`H::scaler()`, which
    /// follows PyTorch); a resumed run continues the checkpoint's instead.
    pub fn run_mixed<H, M, D, O, T>(
        &self,
        task: &mut T,
        model: &mut M,
        work: M::To<H, D>,
        opt: &mut O,
        scaler: GradScaler,
        resume: bool,
    ) -> Result<RunSummary, Error>
    where
        H: HalfFloat,
        D: MixedDevice<H>,
        M: TensorCollection<f32, D> + ZeroGrads<f32, D> + dfdx::nn::NumParams<f32, D>,
        M::To<H, D>: TensorCollection<H, D> + ZeroGrads<H, D>,
        O: Optim<M, f32, D>,
        T: Task<M, f32, D> + MixedTask<M::To<H, D>, D, H>,
        Error: From<<D as HasErr>::Err>,
    {
        self.run_in(
            task,
            model,
            opt,
            resume,
            &mut Mixed {
                scaler,
                work,
                half: PhantomData::<H>,
            },
        )
    }

    fn run_in<M, E, D, O, T, S>(
        &self,
        task: &mut T,
        model: &mut M,
        opt: &mut O,
        resume: bool,
        mode: &mut S,
    ) -> Result<RunSummary, Error>
    where
        E: Dtype + CheckpointElem + SafeDtype,
        D: Device<E>,
        M: TensorCollection<E, D> + ZeroGrads<E, D> + dfdx::nn::NumParams<E, D>,
        O: Optim<M, E, D>,
        T: Task<M, E, D>,
        S: StepMode<M, E, D, T>,
        Error: From<D::Err>,
    {
        let cfg = &self.config;
        let started = Instant::now();
        let rss_at_start_bytes = rss_bytes();
        std::fs::create_dir_all(&cfg.out).map_err(|e| io_error(&cfg.out, e))?;
        let params = model.num_trainable_params();
        let mut start = 0;
        if resume {
            let state = read_checkpoint_state(&cfg.out, cfg, params)?;
            let dir = cfg.out.join("checkpoint");
            load_safetensors(
                model,
                dir.join("model.safetensors"),
                &LoadOptions::default(),
            )?;
            let st = OptimizerState::load_safetensors(dir.join("optimizer.safetensors"))?;
            opt.load_state(model, &st)?;
            if let (Some(scaler), Some(saved)) = (mode.scaler(), state.scaler) {
                *scaler = saved;
            }
            start = state.step;
            if start > cfg.steps {
                return Err(Error::Config(format!(
                    "the checkpoint is at step {start}, beyond --steps {}; ask for more steps",
                    cfg.steps
                )));
            }
        }
        let root = self.shard().is_root();
        // A batch that does not split over the ranks is refused before any work.
        self.shard().rows(cfg.batch_size)?;
        if let Some(g) = &self.group {
            let mut theirs = [start as f64];
            g.broadcast_f64(&mut theirs, "the start-step check")?;
            if theirs[0] != start as f64 {
                return Err(Error::Distributed(format!(
                    "rank {} resumes at step {start} but rank 0 at step {}: the ranks read \
                     different checkpoints; --resume must name one directory that every rank \
                     sees (shared storage)",
                    g.shard().rank,
                    theirs[0]
                )));
            }
            broadcast_model(g.as_ref(), model)?;
        }
        let metrics_path = cfg.out.join("metrics.jsonl");
        let mut metrics = if root {
            Some(MetricsLog::open(&metrics_path, start, resume)?)
        } else {
            None
        };
        let schedule = WarmupCosine {
            peak_lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup_steps: cfg.warmup_steps,
            decay_steps: cfg.steps,
        };
        let bar = if root { progress_bar(cfg, start) } else { None };
        let mut recent: Vec<f64> = Vec::new();
        let mut items_total = 0usize;
        let mut step_time = 0.0f64;
        let mut eval = Metrics::new();
        let mut grads = Some(model.try_alloc_grads()?);
        let mut memory = DeviceMemory::new::<D>();
        let mut step = start;
        let mut interrupted = false;
        while step < cfg.steps {
            let lr = schedule.apply(opt, step);
            let t0 = Instant::now();
            let mut g = grads
                .take()
                .ok_or_else(|| Error::Config("lost gradients".into()))?;
            model.try_zero_grads(&mut g)?;
            // Dropout masks from (seed, step, rank): a resumed run drops what this one would,
            // and each rank draws its own.
            crate::layers::dropout::seed_dropout(
                cfg.seed
                    ^ (step as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ (self.shard().rank as u64).wrapping_mul(0xd1b5_4a32_d192_ed03),
            );
            let mut out = mode.step(task, model, step, g)?;
            if let Some(e) = crate::recompute::take_error() {
                // A recomputed layer failed in the backward pass: its gradients are missing.
                return Err(e);
            }
            let mut stop_now = self.stop.load(Ordering::SeqCst);
            if let Some(g) = &self.group {
                g.set_step(step + 1);
                average_gradients(g.as_ref(), model, &mut out.grads)?;
                // Every rank must agree on the loss it reports, on skipping the step (one
                // rank's overflow poisons the average) and on stopping.
                let world = g.shard().world as f64;
                let mut agreed = [
                    out.loss / world,
                    out.items as f64,
                    f64::from(u8::from(out.skipped)),
                    f64::from(u8::from(stop_now)),
                ];
                let mine = agreed;
                g.all_reduce_sum_f64(&mine, &mut agreed, "the step's loss all-reduce")?;
                out.loss = agreed[0];
                out.items = agreed[1] as usize;
                out.skipped = agreed[2] > 0.0;
                stop_now = agreed[3] > 0.0;
            }
            let scaler = mode.scaler();
            if scaler.is_none() && !out.loss.is_finite() {
                return Err(Error::Config(format!(
                    "the loss became {} at step {step}; lower --lr (now {}) or check the data",
                    out.loss, cfg.lr
                )));
            }
            let loss_scale = scaler.as_ref().map(|s| s.scale);
            let mut g = out.grads;
            let mut grad_norm = f64::NAN;
            if !out.skipped {
                if let Some(c) = cfg.grad_clip {
                    grad_norm = clip_grad_norm(&mut g, model, c)?;
                }
                opt.step(model, &mut g)?;
                task.after_step(model)?;
            }
            if let Some(s) = mode.scaler() {
                s.update(out.skipped);
            }
            grads = Some(g);
            let dt = t0.elapsed().as_secs_f64();
            step_time += dt;
            items_total += out.items;
            step += 1;
            if out.loss.is_finite() {
                recent.push(out.loss);
            }
            if recent.len() > 20 {
                recent.remove(0);
            }
            let mut line = serde_json::json!({
                "step": step, "loss": out.loss, "lr": lr,
                "items_per_sec": out.items as f64 / dt.max(1e-9),
            });
            if grad_norm.is_finite() {
                line["grad_norm"] = serde_json::json!(grad_norm);
            }
            if let Some(s) = loss_scale {
                line["loss_scale"] = serde_json::json!(s);
            }
            if out.skipped {
                line["skipped"] = serde_json::json!(true);
            }
            if let Some(m) = &mut metrics {
                m.write(&line)?;
            }
            memory.sample();
            if let Some(s) = mode.scaler() {
                s.check()?;
            }
            if let Some(b) = &bar {
                b.set_position(step as u64);
                b.set_message(format!(
                    "loss {:.4}  {:.0} {}/s",
                    out.loss,
                    items_total as f64 / step_time.max(1e-9),
                    cfg.unit
                ));
            }
            let last = step == cfg.steps;
            interrupted = (stop_now || cfg.stop_after == Some(step)) && !last;
            let eval_now = last || (cfg.eval_every > 0 && step % cfg.eval_every == 0);
            if eval_now {
                eval = self.evaluate_in_group(task, model)?;
            }
            if root && eval_now {
                let mut line = serde_json::json!({ "step": step });
                for (k, v) in &eval {
                    line[k] = serde_json::json!(v);
                }
                if let Some(m) = &mut metrics {
                    m.write(&line)?;
                }
                let shown: Vec<String> = eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                let samples = task.samples(model)?;
                let mut text = format!("step {step}: {}", shown.join(", "));
                for s in samples {
                    text.push('\n');
                    text.push_str(&s);
                }
                match &bar {
                    Some(b) => b.println(text),
                    None => println!("{text}"),
                }
            }
            if root
                && (last
                    || interrupted
                    || (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0))
            {
                let scaler = mode.scaler().map(|s| *s);
                self.save_checkpoint(model, opt, step, params, scaler)?;
            }
            if interrupted {
                break;
            }
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let summary = RunSummary {
            model: cfg.model.clone(),
            preset: cfg.preset.clone(),
            params,
            steps: step,
            train_loss: if recent.is_empty() {
                f64::NAN
            } else {
                recent.iter().sum::<f64>() / recent.len() as f64
            },
            eval,
            items_per_sec: items_total as f64 / step_time.max(1e-9),
            unit: cfg.unit.clone(),
            peak_rss_bytes: peak_rss_bytes(),
            rss_at_start_bytes,
            peak_device_memory_bytes: memory.peak(),
            skipped_steps: mode.scaler().map_or(0, |s| s.skipped_steps),
            loss_scale: mode.scaler().map(|s| s.scale),
            device: cfg.device.clone(),
            dtype: cfg.dtype.clone(),
            wall_seconds: started.elapsed().as_secs_f64(),
            interrupted,
        };
        if !root {
            return Ok(summary);
        }
        self.write_summary(&summary)?;
        let text =
            std::fs::read_to_string(&metrics_path).map_err(|e| io_error(&metrics_path, e))?;
        let title = format!("{} {} ({} steps)", cfg.model, cfg.preset, step);
        crate::plot::write_png(
            &crate::plot::Curves::from_jsonl(&text),
            &title,
            &cfg.out.join("curves.png"),
        )?;
        Ok(summary)
    }

    fn write_summary(&self, summary: &RunSummary) -> Result<(), Error> {
        let json = serde_json::to_string_pretty(&summary.to_json())
            .map_err(|e| Error::Checkpoint(format!("cannot encode the summary: {e}")))?;
        std::fs::create_dir_all(&self.config.out).map_err(|e| io_error(&self.config.out, e))?;
        write_atomically(
            &self.config.out.join("summary.json"),
            (json + "\n").as_bytes(),
        )
    }

    /// Evaluates `model`: alone, or in a group, each rank its shard when the task can
    /// ([`Task::evaluate_shard`]), else rank 0 alone, both with rank 0's model. Every
    /// rank must call it; the metrics are rank 0's to report (empty on the other ranks when
    /// rank 0 evaluates alone).
    fn evaluate_in_group<M, E, D, T>(&self, task: &mut T, model: &mut M) -> Result<Metrics, Error>
    where
        E: Dtype,
        D: Device<E>,
        M: TensorCollection<E, D>,
        T: Task<M, E, D>,
        Error: From<D::Err>,
    {
        let Some(g) = &self.group else {
            return task.evaluate(model);
        };
        // The trained weights are equal on every rank, but the running statistics (BatchNorm)
        // are each rank's own: every rank evaluates rank 0's, the model rank 0 saves. PyTorch's
        // DistributedDataParallel broadcasts rank 0's buffers the same way.
        broadcast_model(g.as_ref(), model)?;
        let Some(mine) = task.evaluate_shard(model, g.shard())? else {
            return if g.shard().is_root() {
                task.evaluate(model)
            } else {
                Ok(Metrics::new())
            };
        };
        // The ranks must add up the same metrics in the same order: rank 0's names decide.
        let names: Vec<&String> = mine.keys().collect();
        let ours = serde_json::to_vec(&names).map_err(|e| Error::Config(e.to_string()))?;
        let mut theirs = ours.clone();
        g.broadcast_bytes(&mut theirs, "the evaluation's metric names")?;
        if theirs != ours {
            return Err(Error::Distributed(format!(
                "rank {} evaluated the metrics {names:?}, rank 0 {}: the ranks run different \
                 tasks",
                g.shard().rank,
                String::from_utf8_lossy(&theirs)
            )));
        }
        let send: Vec<f64> = mine.values().flat_map(|&(s, w)| [s, w]).collect();
        let mut sum = vec![0.0; send.len()];
        g.all_reduce_sum_f64(&send, &mut sum, "the evaluation's all-reduce")?;
        let total: MetricSums = mine
            .keys()
            .zip(sum.chunks_exact(2))
            .map(|(k, sw)| (k.clone(), (sw[0], sw[1])))
            .collect();
        Ok(ratios(&total))
    }

    /// Evaluates `model` once, without training, and writes `summary.json` (`--eval-only`).
    pub fn evaluate_only<M, E, D, T>(
        &self,
        task: &mut T,
        model: &mut M,
    ) -> Result<RunSummary, Error>
    where
        E: Dtype,
        D: Device<E>,
        M: dfdx::nn::NumParams<E, D>,
        T: Task<M, E, D>,
        Error: From<D::Err>,
    {
        let started = Instant::now();
        let root = self.shard().is_root();
        let eval = self.evaluate_in_group(task, model)?;
        let cfg = &self.config;
        if root {
            let shown: Vec<String> = eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            println!("{}", shown.join(", "));
        }
        let summary = RunSummary {
            model: cfg.model.clone(),
            preset: cfg.preset.clone(),
            params: model.num_trainable_params(),
            steps: 0,
            train_loss: f64::NAN,
            eval,
            items_per_sec: 0.0,
            unit: cfg.unit.clone(),
            peak_rss_bytes: peak_rss_bytes(),
            rss_at_start_bytes: 0,
            peak_device_memory_bytes: DeviceMemory::new::<D>().peak(),
            skipped_steps: 0,
            loss_scale: None,
            device: cfg.device.clone(),
            dtype: cfg.dtype.clone(),
            wall_seconds: started.elapsed().as_secs_f64(),
            interrupted: false,
        };
        if root {
            self.write_summary(&summary)?;
        }
        Ok(summary)
    }

    /// Writes `DIR/checkpoint/` through `DIR/checkpoint.tmp/` and renames.
    fn save_checkpoint<M, E, D, O>(
        &self,
        model: &M,
        opt: &mut O,
        step: usize,
        params: usize,
        scaler: Option<GradScaler>,
    ) -> Result<(), Error>
    where
        E: Dtype + CheckpointElem + SafeDtype,
        D: Device<E>,
        M: TensorCollection<E, D>,
        O: Optim<M, E, D>,
        Error: From<D::Err>,
    {
        let cfg = &self.config;
        let dir = cfg.out.join("checkpoint");
        let tmp = cfg.out.join("checkpoint.tmp");
        let old = cfg.out.join("checkpoint.old");
        for d in [&tmp, &old] {
            if d.exists() {
                std::fs::remove_dir_all(d).map_err(|e| io_error(d, e))?;
            }
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
        save_safetensors(model, tmp.join("model.safetensors"))?;
        opt.state(model)?
            .save_safetensors(tmp.join("optimizer.safetensors"))?;
        let state = CheckpointState {
            model: cfg.model.clone(),
            preset: cfg.preset.clone(),
            params,
            step,
            seed: cfg.seed,
            config: cfg.clone(),
            scaler,
        };
        let json = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::Checkpoint(format!("cannot encode the checkpoint state: {e}")))?;
        write_atomically(&tmp.join("state.json"), json.as_bytes())?;
        // The old checkpoint stays until the new one is complete and in place.
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(|e| io_error(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| io_error(&tmp, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io_error(&old, e))?;
        }
        Ok(())
    }
}

/// How a step's forward and backward passes run: in the model's element type ([`Plain`]), or
/// in mixed precision ([`Mixed`]).
trait StepMode<M, E: Dtype, D: Device<E>, T> {
    fn step(
        &mut self,
        task: &mut T,
        model: &mut M,
        step: usize,
        grads: Gradients<E, D>,
    ) -> Result<Stepped<E, D>, Error>;
    /// The loss scaler, in mixed precision.
    fn scaler(&mut self) -> Option<&mut GradScaler>;
}

/// What a [`StepMode`] step computed.
struct Stepped<E: Dtype, D: Device<E>> {
    loss: f64,
    grads: Gradients<E, D>,
    items: usize,
    /// The gradients overflowed: no optimizer step.
    skipped: bool,
}

struct Plain;

impl<M, E: Dtype, D: Device<E>, T: Task<M, E, D>> StepMode<M, E, D, T> for Plain {
    fn step(
        &mut self,
        task: &mut T,
        model: &mut M,
        step: usize,
        grads: Gradients<E, D>,
    ) -> Result<Stepped<E, D>, Error> {
        let out = task.train_step(model, step, grads)?;
        Ok(Stepped {
            loss: out.loss,
            grads: out.grads,
            items: out.items,
            skipped: false,
        })
    }
    fn scaler(&mut self) -> Option<&mut GradScaler> {
        None
    }
}

struct Mixed<W, H> {
    scaler: GradScaler,
    work: W,
    half: PhantomData<H>,
}

impl<H, M, D, T> StepMode<M, f32, D, T> for Mixed<M::To<H, D>, H>
where
    H: HalfFloat,
    D: MixedDevice<H>,
    M: TensorCollection<f32, D>,
    M::To<H, D>: TensorCollection<H, D> + ZeroGrads<H, D>,
    T: MixedTask<M::To<H, D>, D, H>,
    Error: From<<D as HasErr>::Err>,
{
    fn step(
        &mut self,
        task: &mut T,
        model: &mut M,
        step: usize,
        mut grads: Gradients<f32, D>,
    ) -> Result<Stepped<f32, D>, Error> {
        let out = mixed_step(
            model,
            &mut self.work,
            &mut grads,
            &self.scaler,
            |half, g| task.half_loss(half, step, g),
        )?;
        Ok(Stepped {
            loss: out.loss,
            grads,
            items: out.items,
            skipped: out.found_inf,
        })
    }
    fn scaler(&mut self) -> Option<&mut GradScaler> {
        Some(&mut self.scaler)
    }
}

/// The peak memory of the run's device (see [`RunSummary::peak_device_memory_bytes`]).
struct DeviceMemory {
    cuda: bool,
    peak: u64,
}

impl DeviceMemory {
    // `D` is only read in a build with CUDA.
    #[allow(clippy::extra_unused_type_parameters)]
    fn new<D: 'static>() -> Self {
        #[cfg(feature = "cuda")]
        let cuda = std::any::TypeId::of::<D>() == std::any::TypeId::of::<dfdx::tensor::Cuda>();
        #[cfg(not(feature = "cuda"))]
        let cuda = false;
        let mut m = DeviceMemory { cuda, peak: 0 };
        m.sample();
        m
    }

    fn sample(&mut self) {
        #[cfg(feature = "cuda")]
        if self.cuda {
            // The context dfdx made current on this thread when it built the device.
            if let Ok((free, total)) = cudarc::driver::result::mem_get_info() {
                self.peak = self.peak.max(total.saturating_sub(free) as u64);
            }
        }
    }

    fn peak(&self) -> u64 {
        if self.cuda {
            self.peak
        } else {
            peak_rss_bytes()
        }
    }
}

fn progress_bar(cfg: &TrainConfig, start: usize) -> Option<indicatif::ProgressBar> {
    if !cfg.progress {
        return None;
    }
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("{} {}", cfg.model, cfg.preset));
    bar.set_position(start as u64);
    Some(bar)
}

/// `metrics.jsonl`, appended line by line; on resume, cut back to the checkpoint's step so the
/// file reads as if the run had never stopped.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn open(path: &Path, step: usize, resume: bool) -> Result<Self, Error> {
        let kept = if resume {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            text.lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        } else {
            String::new()
        };
        write_atomically(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        Ok(MetricsLog {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<(), Error> {
        writeln!(self.file, "{v}").map_err(|e| io_error(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    /// Linear regression on batches drawn from (seed, step): the smallest honest task. With
    /// `stop_at`, it raises the trainer's stop flag during that step, as Ctrl-C would.
    struct Regression {
        seed: u64,
        stop_at: Option<(usize, Arc<AtomicBool>)>,
    }

    type Model = Built<Linear<3, 1>, f32, Cpu>;

    impl Regression {
        fn batch(
            &self,
            step: usize,
        ) -> (Tensor<Rank2<8, 3>, f32, Cpu>, Tensor<Rank2<8, 1>, f32, Cpu>) {
            let dev = Cpu::seed_from_u64(self.seed ^ (step as u64).wrapping_mul(0x9e37_79b9));
            let x: Tensor<Rank2<8, 3>, f32, Cpu> = dev.sample_normal();
            let w = dev.tensor([[1.0f32], [-2.0], [0.5]]);
            let y = x.clone().matmul(w) + 0.25;
            (x, y)
        }
    }

    impl Task<Model, f32, Cpu> for Regression {
        fn train_step(
            &mut self,
            model: &mut Model,
            step: usize,
            grads: Gradients<f32, Cpu>,
        ) -> Result<StepOutput<f32, Cpu>, Error> {
            if let Some((at, flag)) = &self.stop_at {
                if *at == step {
                    flag.store(true, Ordering::SeqCst);
                }
            }
            let (x, y) = self.batch(step);
            let loss = mse(model.forward_mut(x.traced(grads)), y)?;
            let value = loss.array() as f64;
            Ok(StepOutput {
                loss: value,
                grads: loss.backward(),
                items: 8,
            })
        }

        fn evaluate(&mut self, model: &mut Model) -> Result<Metrics, Error> {
            let (x, y) = self.batch(usize::MAX);
            let loss = mse(model.forward(x), y)?.array() as f64;
            Ok(Metrics::from([("eval_loss".to_string(), loss)]))
        }
    }

    fn config(out: &Path) -> TrainConfig {
        TrainConfig {
            model: "regression".into(),
            preset: "3-1".into(),
            steps: 20,
            batch_size: 8,
            lr: 0.3,
            min_lr: 0.03,
            warmup_steps: 2,
            grad_clip: Some(1.0),
            eval_every: 4,
            checkpoint_every: 5,
            seed: 7,
            device: "cpu".into(),
            dtype: "f32".into(),
            unit: "examples".into(),
            out: out.to_path_buf(),
            progress: false,
            stop_after: None,
            task: serde_json::Value::Null,
        }
    }

    /// A run of 20 steps; `stop_at` interrupts it there, `resume` continues from the checkpoint.
    fn run(out: &Path, stop_at: Option<usize>, resume: bool) -> Result<RunSummary, Error> {
        let dev = Cpu::seed_from_u64(1);
        let mut model = dev.build_module::<Linear<3, 1>, f32>();
        let mut opt: Adam<_, f32, Cpu> = Adam::new(&model, adamw(0.3, 0.01));
        let trainer = Trainer::new(config(out))?;
        let mut task = Regression {
            seed: 7,
            stop_at: stop_at.map(|s| (s, trainer.stop_flag())),
        };
        trainer.run(&mut task, &mut model, &mut opt, resume)
    }

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("na-train-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    /// Metrics without the throughput, which differs between any two runs.
    fn metrics(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("items_per_sec");
                v
            })
            .collect()
    }

    /// Interrupted at step 12 and resumed, a run writes the same metrics, value for value, as
    /// one that never stopped; the summary and the checkpoint say where it is.
    #[test]
    fn an_interrupted_run_resumes_exactly() -> Result<(), Error> {
        let (a, b) = (temp("whole"), temp("parts"));
        let whole = run(&a, None, false)?;
        assert!(!whole.interrupted && whole.steps == 20);
        let first = metrics(&a)[4]["eval_loss"].as_f64().unwrap();
        let last = whole.eval["eval_loss"];
        assert!(last < first / 4.0, "the loss went down: {first} -> {last}");
        let part = run(&b, Some(11), false)?;
        assert!(part.interrupted && part.steps == 12, "{part:?}");
        let state: CheckpointState = serde_json::from_str(
            &std::fs::read_to_string(b.join("checkpoint/state.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(state.step, 12);
        let rest = run(&b, None, true)?;
        assert_eq!(rest.steps, 20);
        assert_eq!(metrics(&a), metrics(&b));
        assert_eq!(whole.eval, rest.eval);
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(b.join("summary.json")).unwrap())
                .unwrap();
        for k in [
            "model",
            "preset",
            "params",
            "steps",
            "train_loss",
            "eval_loss",
            "examples_per_sec",
            "peak_rss_bytes",
            "device",
            "dtype",
            "wall_seconds",
        ] {
            assert!(
                summary.get(k).is_some(),
                "summary.json lacks {k}: {summary}"
            );
        }
        Ok(())
    }

    /// The regression under a constraint, bias ≤ 0, that `after_step` restores after every
    /// step (the target's bias is +0.25, so training alone would break it).
    struct NonPositiveBias {
        inner: Regression,
        calls: usize,
    }

    impl Task<Model, f32, Cpu> for NonPositiveBias {
        fn train_step(
            &mut self,
            model: &mut Model,
            step: usize,
            grads: Gradients<f32, Cpu>,
        ) -> Result<StepOutput<f32, Cpu>, Error> {
            self.inner.train_step(model, step, grads)
        }

        fn after_step(&mut self, model: &mut Model) -> Result<(), Error> {
            self.calls += 1;
            let b = model.bias.array()[0].min(0.0);
            model.bias.copy_from(&[b]);
            Ok(())
        }

        fn evaluate(&mut self, model: &mut Model) -> Result<Metrics, Error> {
            self.inner.evaluate(model)
        }
    }

    #[test]
    fn after_step_runs_after_every_optimizer_step() -> Result<(), Error> {
        let dir = temp("after-step");
        let dev = Cpu::seed_from_u64(1);
        let mut model = dev.build_module::<Linear<3, 1>, f32>();
        let mut opt: Adam<_, f32, Cpu> = Adam::new(&model, adamw(0.3, 0.01));
        let mut task = NonPositiveBias {
            inner: Regression {
                seed: 7,
                stop_at: None,
            },
            calls: 0,
        };
        Trainer::new(config(&dir))?.run(&mut task, &mut model, &mut opt, false)?;
        assert_eq!(task.calls, 20);
        assert!(model.bias.array()[0] <= 0.0, "{:?}", model.bias.array());
        // The checkpoint holds the constrained weights.
        let mut saved = dev.build_module::<Linear<3, 1>, f32>();
        crate::checkpoint::load_safetensors(
            &mut saved,
            dir.join("checkpoint").join("model.safetensors"),
            &Default::default(),
        )?;
        assert_eq!(saved.bias.array(), model.bias.array());
        // Unconstrained, the same run ends with a positive bias.
        let free = temp("after-step-free");
        let mut model = dev.build_module::<Linear<3, 1>, f32>();
        let mut opt: Adam<_, f32, Cpu> = Adam::new(&model, adamw(0.3, 0.01));
        let mut task = Regression {
            seed: 7,
            stop_at: None,
        };
        Trainer::new(config(&free))?.run(&mut task, &mut model, &mut opt, false)?;
        assert!(model.bias.array()[0] > 0.0, "{:?}", model.bias.array());
        std::fs::remove_dir_all(dir).ok();
        std::fs::remove_dir_all(free).ok();
        Ok(())
    }

    #[test]
    fn a_checkpoint_of_another_model_is_refused() -> Result<(), Error> {
        let dir = temp("other");
        run(&dir, None, false)?;
        let mut cfg = config(&dir);
        cfg.preset = "other".into();
        let e = read_checkpoint_state(&dir, &cfg, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preset `3-1`") && e.contains("preset `other`"),
            "{e}"
        );
        let e = read_checkpoint_state(&temp("none"), &cfg, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot resume"), "{e}");
        std::fs::write(dir.join("checkpoint/model.safetensors"), b"truncated").unwrap();
        let e = run(&dir, None, true).unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
