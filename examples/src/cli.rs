//! The flags every trainer binary shares, and what they turn into.

use anyhow::{bail, Context, Result};
use clap::Args;
use neural_arch::amp::{half_copy, HalfFloat, MixedDevice, MixedTask};
use neural_arch::checkpoint::{load_safetensors, LoadOptions};
use neural_arch::dist::{Collective, Shard};
use neural_arch::prelude::*;
use neural_arch::train::{RunSummary, Task, TrainConfig, Trainer};
use std::path::PathBuf;
use std::rc::Rc;

/// Flags common to `train-gpt2`, `train-llama`, ...
#[derive(Args, Debug, Clone, PartialEq)]
pub struct CommonArgs {
    /// Model size: `tiny` trains on a laptop CPU in minutes; the others are the standard sizes.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Optimizer steps (default: the binary's own).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the training data, instead of --steps.
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<f64>,
    /// Examples (sequences or images) per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (AdamW, linear warm-up, cosine decay to a tenth).
    #[arg(long)]
    pub lr: Option<f64>,
    /// `cpu`, or `cuda` / `cuda:N` in a binary built with `--features cuda` (with
    /// --distributed, `cuda` is the GPU of the process's local rank: one GPU per process).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Element type of the forward and backward passes: `f32`, or `f16` / `bf16` for mixed
    /// precision (f32 master weights; dynamic loss scaling for f16, none needed for bf16).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: metrics, curves, checkpoint, summary (default `runs/<model>-<preset>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run whose output directory this is, from its checkpoint.
    #[arg(long, conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Evaluate every this many steps (and at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write a checkpoint every this many steps (and at the end; Ctrl-C writes one too).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Start from these weights (a safetensors file with upstream key names).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Only evaluate (the weights of --init-from, or of a --resume checkpoint) and write the
    /// summary.
    #[arg(long)]
    pub eval_only: bool,
    /// No progress bar (the metrics still go to metrics.jsonl).
    #[arg(long)]
    pub no_progress: bool,
    /// Stop after this step with a checkpoint, as Ctrl-C does; continue later with --resume.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Gradient checkpointing: recompute the transformer blocks in the backward pass instead
    /// of keeping their activations (less memory, one more forward pass per block; GPT-2 and
    /// Llama, whose blocks are declared `#[recompute]`).
    #[arg(long)]
    pub recompute: bool,
    /// Data-parallel training in the processes `mpirun -np N` started (a binary built with
    /// `--features mpi`): each takes 1/N of every batch (--batch-size is the global batch),
    /// gradients are averaged by an all-reduce, and rank 0 writes the files.
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: seconds a rank waits for the others in one collective before it
    /// ends the job (a rank that died or hangs); must exceed an evaluation's length.
    #[arg(long, default_value_t = 300.0)]
    pub dist_timeout: f64,
}

#[cfg(feature = "mpi")]
thread_local! {
    /// The process's MPI group, once `--distributed` started it (MPI starts once per process).
    static MPI: std::cell::OnceCell<Rc<neural_arch::dist::MpiGroup>> = const { std::cell::OnceCell::new() };
}

/// This process's index among the processes the MPI launcher started on this machine (Open
/// MPI's, MPICH's or PMI's variable); 0 when not launched by one.
fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "PMI_LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

/// The number of processes the MPI launcher started, from its environment (Open MPI's or
/// MPICH's / PMI's variables); 1 when not launched by one.
pub fn launched_world_size() -> usize {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// CUDA device `ordinal`, seeded with the run's seed; a missing or unusable GPU is an error
/// that says what to check.
#[cfg(feature = "cuda")]
pub fn cuda_device(c: &CommonArgs, ordinal: usize) -> Result<Cuda> {
    Cuda::try_build(ordinal, c.seed).map_err(|e| {
        anyhow::anyhow!(
            "--device {}: no usable CUDA device {ordinal} ({e:?}); check `nvidia-smi`, or use \
             --device cpu",
            c.device
        )
    })
}

/// A weight-initialisation rule by tensor name and shape (see [`neural_arch::init`]).
pub type InitRule = dyn Fn(&str, &[usize]) -> neural_arch::init::Init;

/// Where a run's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
}

/// What the binary's defaults are, where a flag is not given.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps between evaluations.
    pub eval_every: usize,
    /// Steps of warm-up.
    pub warmup_steps: usize,
    /// What an example counts as: `tokens` or `images`.
    pub unit: &'static str,
}

impl CommonArgs {
    /// The run's directory: `--resume DIR`, `--out DIR`, or `runs/<model>-<preset>`.
    pub fn out_dir(&self, model: &str) -> PathBuf {
        match (&self.resume, &self.out) {
            (Some(r), _) => r.clone(),
            (None, Some(o)) => o.clone(),
            (None, None) => PathBuf::from("runs").join(format!("{model}-{}", self.preset)),
        }
    }

    /// The device `--device` names (`cuda` is `cuda:0`), after checking that this build can
    /// use it and that the element type is one the trainers take; refusals name the way out.
    pub fn device_choice(&self) -> Result<DeviceChoice> {
        let choice = match self.device.as_str() {
            "cpu" => DeviceChoice::Cpu,
            // One GPU per process: the launcher numbers the processes of each machine.
            "cuda" if self.distributed => DeviceChoice::Cuda(local_rank()),
            "cuda" => DeviceChoice::Cuda(0),
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceChoice::Cuda(n),
                _ => bail!("--device {d}: unknown device; use cpu, cuda or cuda:N"),
            },
        };
        if let DeviceChoice::Cuda(_) = choice {
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device {}: this binary was built without CUDA; build it with \
                     `cargo build --release --features cuda` (needs the CUDA toolkit and a GPU), \
                     or use --device cpu",
                    self.device
                );
            }
        }
        self.check_dtype()?;
        Ok(choice)
    }

    /// The data-parallel group with `--distributed` (MPI starts on the first call), else
    /// `None`. Refuses `--distributed` in a build without MPI, and a launch by `mpirun` of
    /// several processes without `--distributed` (each would train alone and overwrite the
    /// others' files).
    pub fn group(&self) -> Result<Option<Rc<dyn Collective>>> {
        if !self.distributed {
            let n = launched_world_size();
            if n > 1 {
                bail!(
                    "this process is one of {n} that mpirun started, but --distributed is not \
                     given: each would train alone and overwrite the others' files; add \
                     --distributed, or run one process"
                );
            }
            return Ok(None);
        }
        if !(self.dist_timeout.is_finite() && self.dist_timeout > 0.0) {
            bail!(
                "--dist-timeout must be a positive number of seconds, got {}",
                self.dist_timeout
            );
        }
        #[cfg(feature = "mpi")]
        {
            let timeout = std::time::Duration::from_secs_f64(self.dist_timeout);
            let group = MPI.with(|cell| -> Result<Rc<neural_arch::dist::MpiGroup>> {
                if let Some(g) = cell.get() {
                    return Ok(g.clone());
                }
                let g = Rc::new(neural_arch::dist::MpiGroup::init(timeout)?);
                if g.shard().is_root() {
                    eprintln!(
                        "distributed: {} processes over {}",
                        g.shard().world,
                        g.engine()
                    );
                }
                let _ = cell.set(g.clone());
                Ok(g)
            })?;
            Ok(Some(group as Rc<dyn Collective>))
        }
        #[cfg(not(feature = "mpi"))]
        bail!(
            "--distributed: this binary was built without MPI; build it with `cargo build \
             --release --features mpi` (needs Open MPI and libclang: bash \
             tools/install-openmpi.sh), then launch it with `mpirun -np N`"
        )
    }

    /// This process's shard of each batch: its rank and the group's size (one process
    /// without `--distributed`).
    pub fn shard(&self) -> Result<Shard> {
        Ok(self.group()?.map_or(Shard::SINGLE, |g| g.shard()))
    }

    /// What rank 0's `make` returns, on every rank of the `--distributed` group (only rank 0
    /// runs `make`); `make`'s own value outside a group. For what must be identical on every
    /// rank and is made once, such as a trained tokenizer, which rank 0 also saves.
    pub fn made_by_root(&self, make: impl FnOnce() -> Result<String>) -> Result<String> {
        let Some(g) = self.group()? else {
            return make();
        };
        let mut bytes = if g.shard().is_root() {
            make()?.into_bytes()
        } else {
            Vec::new()
        };
        g.broadcast_bytes(&mut bytes, "the broadcast of rank 0's tokenizer")?;
        Ok(String::from_utf8(bytes)?)
    }

    /// A trainer for `config`, in the `--distributed` group when there is one.
    pub fn trainer(&self, config: TrainConfig) -> Result<Trainer> {
        let trainer = Trainer::new(config)?;
        Ok(match self.group()? {
            Some(g) => trainer.with_group(g),
            None => trainer,
        })
    }

    fn check_dtype(&self) -> Result<()> {
        match self.dtype.as_str() {
            "f32" | "f16" | "bf16" => Ok(()),
            d => bail!("--dtype {d}: unknown element type; use f32, f16 or bf16"),
        }
    }

    /// Switches gradient checkpointing on for this thread when `--recompute` is given; a model
    /// without `#[recompute]` blocks (`recomputes` false) refuses the flag.
    pub fn apply_recompute(&self, model: &str, recomputes: bool) -> Result<()> {
        if self.recompute && !recomputes {
            bail!(
                "--recompute: {model} declares no recomputed blocks (GPT-2 and Llama do); run \
                 without it"
            );
        }
        neural_arch::recompute::set_enabled(self.recompute);
        Ok(())
    }

    /// The trainer's configuration; `examples_per_epoch` turns --epochs into steps.
    pub fn train_config(
        &self,
        model: &str,
        d: &Defaults,
        examples_per_epoch: usize,
    ) -> Result<TrainConfig> {
        let batch_size = self.batch_size.unwrap_or(d.batch_size);
        if batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let steps = match (self.steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) if e > 0.0 => {
                ((e * examples_per_epoch as f64) / batch_size as f64).ceil() as usize
            }
            (None, Some(e)) => bail!("--epochs must be positive, got {e}"),
            (None, None) => d.steps,
        };
        if steps == 0 {
            bail!("--steps must be at least 1");
        }
        let out = self.out_dir(model);
        let lr = self.lr.unwrap_or(d.lr);
        Ok(TrainConfig {
            model: model.into(),
            preset: self.preset.clone(),
            steps,
            batch_size,
            lr,
            min_lr: lr / 10.0,
            warmup_steps: d.warmup_steps.min(steps / 10),
            grad_clip: Some(1.0),
            eval_every: self.eval_every.unwrap_or(d.eval_every),
            checkpoint_every: self.checkpoint_every.unwrap_or(0),
            seed: self.seed,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            unit: d.unit.into(),
            out,
            progress: !self.no_progress,
            stop_after: self.stop_after,
            task: serde_json::Value::Null,
        })
    }
}

/// The run's configuration: from the flags, or, with `--resume`, the settings the run was
/// started with (only `--steps`, `--stop-after` and `--device` may change). `params` is the model's
/// parameter count, which a checkpoint must match; `task` the task's own settings (from
/// [`task_settings`]), which the checkpoint keeps.
pub fn run_config(
    c: &CommonArgs,
    arch: &str,
    defaults: &Defaults,
    params: usize,
    task: &impl serde::Serialize,
) -> Result<TrainConfig> {
    let mut config = c.train_config(arch, defaults, 1)?;
    config.task = serde_json::to_value(task)?;
    let Some(dir) = &c.resume else {
        return Ok(config);
    };
    let state = neural_arch::train::read_checkpoint_state(dir, &config, params)?;
    if c.dtype != state.config.dtype {
        eprintln!(
            "note: the resumed run keeps its element type, --dtype {}, not {}",
            state.config.dtype, c.dtype
        );
    }
    Ok(TrainConfig {
        steps: c.steps.unwrap_or(state.config.steps),
        progress: config.progress,
        out: dir.clone(),
        stop_after: c.stop_after,
        task: config.task,
        // A checkpoint is the same on every device: a run may continue on another one.
        device: c.device.clone(),
        ..state.config
    })
}

/// The task's own settings for this run: `given` (from the binary's flags), or, with
/// `--resume`, the ones the run was started with, which its checkpoint records (see
/// [`run_config`]). A resumed run's batches, masks and held-out set depend on them, and its
/// metrics must continue those of the first part; where the flags differ, a note says so.
pub fn task_settings<S>(c: &CommonArgs, given: S) -> Result<S>
where
    S: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Some(dir) = &c.resume else {
        return Ok(given);
    };
    // A missing or damaged state is reported by `run_config`, with the checks it makes.
    let path = dir.join("checkpoint").join("state.json");
    let Some(state) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<neural_arch::train::CheckpointState>(&t).ok())
    else {
        return Ok(given);
    };
    if state.config.task.is_null() {
        return Ok(given);
    }
    let saved: S = serde_json::from_value(state.config.task.clone()).with_context(|| {
        format!(
            "{} records task settings this program cannot read ({}); start a new run with \
             another --out",
            path.display(),
            state.config.task
        )
    })?;
    if saved != given {
        eprintln!(
            "note: the resumed run keeps its own settings {saved:?}, not the flags' {given:?}"
        );
    }
    Ok(saved)
}

/// Turns `--epochs` into steps over `examples` training examples, in the run's own batch size
/// (a resumed run keeps the one it started with). Without `--epochs`, nothing changes.
pub fn apply_epochs(c: &CommonArgs, config: &mut TrainConfig, examples: usize) -> Result<()> {
    if let Some(epochs) = c.epochs {
        config.steps = ((epochs * examples as f64) / config.batch_size as f64).ceil() as usize;
        anyhow::ensure!(
            config.steps >= 1,
            "--epochs {epochs} is less than one batch of {} examples",
            config.batch_size
        );
    }
    Ok(())
}

/// Trains `model` on `task` with AdamW (`weight_decay`) under the shared trainer, continuing
/// the checkpoint with `--resume`; or, with `--eval-only`, evaluates it once (the weights of
/// the `--resume` checkpoint when given, else the model as it is) and writes the summary.
pub fn train_or_evaluate<M, T, D>(
    c: &CommonArgs,
    config: TrainConfig,
    task: &mut T,
    model: &mut M,
    weight_decay: f64,
) -> Result<RunSummary>
where
    D: Device<f32>,
    M: TensorCollection<f32, D> + ZeroGrads<f32, D> + NumParams<f32, D>,
    T: Task<M, f32, D>,
    ModelError: From<D::Err>,
{
    if c.eval_only {
        if let Some(dir) = &c.resume {
            let path = dir.join("checkpoint").join("model.safetensors");
            load_safetensors(model, &path, &LoadOptions::default())
                .with_context(|| format!("cannot evaluate {}", path.display()))?;
        }
        return Ok(c.trainer(config)?.evaluate_only(task, model)?);
    }
    let mut opt: Adam<M, f32, D> = Adam::new(model, adamw(config.lr, weight_decay));
    let trainer = c.trainer(config)?;
    trainer.stop_on_ctrl_c();
    Ok(trainer.run(task, model, &mut opt, c.resume.is_some())?)
}

/// [`train_or_evaluate`] in mixed precision (`--dtype f16` or `bf16`, the type `H`): `model`
/// keeps the `f32` master weights, and the forward and backward passes run on `H` copies (see
/// `neural_arch::amp`). `--eval-only` evaluates the master weights, as the plain path does.
pub fn train_or_evaluate_mixed<H, M, T, D>(
    c: &CommonArgs,
    config: TrainConfig,
    task: &mut T,
    model: &mut M,
    weight_decay: f64,
) -> Result<RunSummary>
where
    H: HalfFloat,
    D: MixedDevice<H>,
    M: TensorCollection<f32, D> + ZeroGrads<f32, D> + NumParams<f32, D>,
    M::To<H, D>: TensorCollection<H, D> + ZeroGrads<H, D>,
    T: Task<M, f32, D> + MixedTask<M::To<H, D>, D, H>,
    ModelError: From<<D as HasErr>::Err>,
{
    if c.eval_only {
        return train_or_evaluate(c, config, task, model, weight_decay);
    }
    let work = half_copy::<H, _, _>(model).map_err(ModelError::from)?;
    let mut opt: Adam<M, f32, D> = Adam::new(model, adamw(config.lr, weight_decay));
    let trainer = c.trainer(config)?;
    trainer.stop_on_ctrl_c();
    Ok(trainer.run_mixed(task, model, work, &mut opt, H::scaler(), c.resume.is_some())?)
}

/// Ends a trainer binary: one line with the run's result and where its files are, or the error
/// with its causes; the exit status says which. In a `--distributed` group, rank 0 prints the
/// result and MPI shuts down once every rank is done; an error on any rank ends the whole job
/// at once (`MPI_Abort`), so that no rank waits for it.
pub fn report(c: &CommonArgs, result: Result<RunSummary>) -> std::process::ExitCode {
    #[cfg(feature = "mpi")]
    let group = MPI.with(|cell| cell.get().cloned());
    #[cfg(not(feature = "mpi"))]
    let group: Option<Rc<dyn Collective>> = None;
    let shard = group.as_ref().map_or(Shard::SINGLE, |g| g.shard());
    match result {
        Ok(_) if !shard.is_root() => {
            #[cfg(feature = "mpi")]
            if let Some(g) = &group {
                g.finish();
            }
            std::process::ExitCode::SUCCESS
        }
        Ok(s) => {
            #[cfg(feature = "mpi")]
            if let Some(g) = &group {
                g.finish();
            }
            let out = c.out_dir(&s.model);
            println!(
                "done: {} steps, train loss {:.4}, {:?}, {:.0} {}/s, summary in {}",
                s.steps,
                s.train_loss,
                s.eval,
                s.items_per_sec,
                s.unit,
                out.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            if shard.world > 1 {
                eprintln!("error: rank {} of {}: {e:#}", shard.rank, shard.world);
            } else {
                eprintln!("error: {e:#}");
            }
            #[cfg(feature = "mpi")]
            if let Some(g) = &group {
                if shard.world > 1 {
                    g.abort(1);
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}
