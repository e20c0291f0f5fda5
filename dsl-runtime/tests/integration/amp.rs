//! Mixed precision (`neural_arch::amp`): the gradients of an `f16` pass with loss scaling, and
//! of a `bf16` pass without, equal the `f32` gradients to the half type's precision; overflow
//! is found and the step skipped; untrained buffers come back to the master; the trainer
//! trains, skips, counts, and resumes exactly.

use neural_arch::amp::{
    half_copy, mixed_step, scaled_backward, GradScaler, Half, HalfFloat, MixedDevice, MixedOutcome,
    MixedTask,
};
use neural_arch::dfdx::dtypes::bf16;
use neural_arch::prelude::*;
use neural_arch::train::{Metrics, RunSummary, StepOutput, Task, TrainConfig, Trainer};
use std::path::{Path, PathBuf};

model! {
    /// A small classifier with the layers whose precision matters: products, a norm, an
    /// activation.
    pub struct Mlp {
        up: Linear<16, 32>,
        ln: LayerNorm<32>,
        act: GeluTanh,
        down: Linear<32, 8>,
    }
    forward(x: [B, 16]) -> [B, 8];
}

type Master = Built<Mlp, f32, Cpu>;
type Work = Built<Mlp, Half, Cpu>;
type WorkBf16 = Built<Mlp, bf16, Cpu>;

/// Step `step`'s batch: 64 random inputs and their classes.
fn batch(dev: &Cpu, step: usize) -> (Tensor<(usize, Const<16>), f32, Cpu>, Vec<usize>) {
    let dev2 = Cpu::seed_from_u64(1000 + step as u64);
    let x: Tensor<Rank2<64, 16>, f32, Cpu> = dev2.sample_normal();
    let v = x.as_vec();
    // The class is where the first 8 features peak: learnable.
    let y = v
        .chunks(16)
        .map(|r| (0..8).fold(0, |best, j| if r[j] > r[best] { j } else { best }))
        .collect();
    (dev.tensor_from_vec(v, (64, Const::<16>)), y)
}

/// Relative distance ‖a − b‖ / ‖b‖.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

#[test]
fn scaled_backward_multiplies_every_gradient_by_the_scale() {
    let dev = Cpu::seed_from_u64(0);
    let m: Master = dev.build_module::<Mlp, f32>();
    let (x, y) = batch(&dev, 0);
    let loss = |m: &Master| {
        cross_entropy(m.forward(x.clone().leaky_trace()), &y, Default::default()).unwrap()
    };
    let plain = loss(&m).backward();
    let scaled = scaled_backward(loss(&m), 1024.0).unwrap();
    for (p, q) in [
        (
            plain.get(&m.up.weight).as_vec(),
            scaled.get(&m.up.weight).as_vec(),
        ),
        (
            plain.get(&m.down.bias).as_vec(),
            scaled.get(&m.down.bias).as_vec(),
        ),
    ] {
        assert!(p.iter().any(|v| *v != 0.0));
        for (a, b) in p.iter().zip(&q) {
            assert_eq!(a * 1024.0, *b, "a power of two scales exactly");
        }
    }
}

/// One mixed step in the half type `H` with `scaler` against the `f32` pass: the loss within
/// `loss_tol` (relative), every parameter's gradient within `grad_tol` (relative), not exact.
fn mixed_gradients_match<H: HalfFloat>(scaler: GradScaler, loss_tol: f64, grad_tol: f64)
where
    Cpu: MixedDevice<H>,
{
    let dev = Cpu::seed_from_u64(0);
    let mut master: Master = dev.build_module::<Mlp, f32>();
    let mut work: Built<Mlp, H, Cpu> = master.to_dtype::<H>();
    let (x, y) = batch(&dev, 3);
    let (want_loss, want) = {
        let loss = cross_entropy(
            master.forward(x.clone().leaky_trace()),
            &y,
            Default::default(),
        )
        .unwrap();
        (loss.array() as f64, loss.backward())
    };
    let mut grads = master.alloc_grads();
    let out: MixedOutcome = mixed_step(&mut master, &mut work, &mut grads, &scaler, |h, g| {
        let xh = x.clone().to_dtype::<H>();
        let loss = cross_entropy(h.forward_mut(xh.traced(g)), &y, Default::default())?;
        Ok((loss, 64))
    })
    .unwrap();
    assert!(!out.found_inf);
    assert_eq!(out.items, 64);
    assert!(
        (out.loss - want_loss).abs() < loss_tol * want_loss,
        "{}: {} vs {want_loss}",
        H::NAME,
        out.loss
    );
    let (m, g) = (&master, &grads);
    for (name, (a, b)) in [
        (
            "up.weight",
            (
                g.get(&m.up.weight).as_vec(),
                want.get(&m.up.weight).as_vec(),
            ),
        ),
        (
            "up.bias",
            (g.get(&m.up.bias).as_vec(), want.get(&m.up.bias).as_vec()),
        ),
        (
            "ln.weight",
            (
                g.get(&m.ln.weight).as_vec(),
                want.get(&m.ln.weight).as_vec(),
            ),
        ),
        (
            "down.weight",
            (
                g.get(&m.down.weight).as_vec(),
                want.get(&m.down.weight).as_vec(),
            ),
        ),
        (
            "down.bias",
            (
                g.get(&m.down.bias).as_vec(),
                want.get(&m.down.bias).as_vec(),
            ),
        ),
    ] {
        let e = rel(&a, &b);
        assert!(e < grad_tol, "{} {name}: relative error {e}", H::NAME);
        assert!(e > 0.0, "{} {name}: a half type cannot be exact", H::NAME);
    }
}

#[test]
fn mixed_gradients_equal_f32_gradients_to_half_precision() {
    // f16 has an 11-bit significand: 2⁻¹¹ ≈ 5e-4 per rounding.
    mixed_gradients_match::<Half>(GradScaler::default(), 2e-3, 1e-2);
}

#[test]
fn bf16_gradients_equal_f32_gradients_to_bf16_precision_without_scaling() {
    let scaler = bf16::scaler();
    assert_eq!((scaler.scale, scaler.max_scale), (1.0, 1.0));
    // bf16 has an 8-bit significand: 2⁻⁸ ≈ 4e-3 per rounding.
    mixed_gradients_match::<bf16>(scaler, 3e-2, 5e-2);
}

#[test]
fn overflowing_gradients_are_found_and_a_finite_pass_is_not() {
    let dev = Cpu::seed_from_u64(0);
    let mut master: Master = dev.build_module::<Mlp, f32>();
    let mut work: Work = master.to_dtype::<Half>();
    let (x, y) = batch(&dev, 1);
    let mut run = |factor: f32| {
        let mut grads = master.alloc_grads();
        let out = mixed_step(
            &mut master,
            &mut work,
            &mut grads,
            &GradScaler::default(),
            |h, g| {
                // Scaling the logits up scales their gradients up: 2¹⁵ × 10 × ... overflows.
                let logits = h.forward_mut(x.clone().to_dtype::<Half>().traced(g));
                let loss = cross_entropy(logits * Half::from_f32(factor), &y, Default::default())?;
                Ok((loss, 64))
            },
        )
        .unwrap();
        (out, grads)
    };
    let (finite, _) = run(1.0);
    assert!(!finite.found_inf);
    let (overflow, _) = run(3000.0);
    assert!(overflow.found_inf, "{overflow:?}");
}

model! {
    /// A convolution with BatchNorm, whose running statistics are buffers, not parameters.
    pub struct ConvBn {
        conv: Conv2d<1, 2, 3, 1, 1>,
        bn: BatchNorm2d<2>,
    }
    forward(x: [B, 1, 6, 6]) -> [B, 2, 6, 6];
}

#[test]
fn running_statistics_come_back_to_the_master_and_layer_settings_stay() {
    let dev = Cpu::seed_from_u64(0);
    let mut master = dev.build_module::<ConvBn, f32>();
    let mut work = master.to_dtype::<Half>();
    // The working copy keeps its own settings: a refresh replaces tensors only.
    work.bn.momentum = 0.5;
    master.bn.momentum = 0.5;
    let x: Tensor<Rank4<4, 1, 6, 6>, f32, Cpu> = dev.sample_normal();
    let x = x * 3.0 + 2.0;
    let mut reference = master.clone();
    let _ = reference.forward_mut(x.clone().leaky_trace());
    let mut grads = master.alloc_grads();
    mixed_step(
        &mut master,
        &mut work,
        &mut grads,
        &GradScaler::default(),
        |h, g| {
            let y = h.forward_mut(x.clone().to_dtype::<Half>().traced(g));
            Ok((y.mean(), 4))
        },
    )
    .unwrap();
    assert_eq!(work.bn.momentum, 0.5);
    let (a, b) = (
        master.bn.running_mean.as_vec(),
        reference.bn.running_mean.as_vec(),
    );
    assert!(
        b.iter().any(|v| v.abs() > 0.1),
        "the statistics moved: {b:?}"
    );
    assert!(rel(&a, &b) < 1e-2, "{a:?} vs {b:?}");
    let (a, b) = (
        master.bn.running_var.as_vec(),
        reference.bn.running_var.as_vec(),
    );
    assert!(rel(&a, &b) < 1e-2, "{a:?} vs {b:?}");
}

#[test]
fn half_copy_is_the_cast_model() {
    let dev = Cpu::seed_from_u64(0);
    let master: Master = dev.build_module::<Mlp, f32>();
    let work: Work = half_copy(&master).unwrap();
    let cast: Work = master.to_dtype::<Half>();
    assert_eq!(work.up.weight.as_vec(), cast.up.weight.as_vec());
    assert_eq!(work.ln.bias.as_vec(), cast.ln.bias.as_vec());
}

/// Classification batches from (step); `overflow_at` makes that step's gradients overflow, as a
/// spike would.
struct Classify {
    dev: Cpu,
    overflow_at: Option<usize>,
}

impl Task<Master, f32, Cpu> for Classify {
    fn train_step(
        &mut self,
        model: &mut Master,
        step: usize,
        grads: Gradients<f32, Cpu>,
    ) -> Result<StepOutput<f32, Cpu>, ModelError> {
        let (x, y) = batch(&self.dev, step);
        let loss = cross_entropy(model.forward_mut(x.traced(grads)), &y, Default::default())?;
        Ok(StepOutput {
            loss: loss.array() as f64,
            grads: loss.backward(),
            items: 64,
        })
    }

    fn evaluate(&mut self, model: &mut Master) -> Result<Metrics, ModelError> {
        let (x, y) = batch(&self.dev, 0);
        let loss = cross_entropy(model.forward(x), &y, Default::default())?;
        Ok(Metrics::from([(
            "eval_loss".to_string(),
            loss.array() as f64,
        )]))
    }
}

impl MixedTask<Work, Cpu> for Classify {
    fn half_loss(
        &mut self,
        model: &mut Work,
        step: usize,
        grads: Gradients<Half, Cpu>,
    ) -> Result<(Tensor<Rank0, Half, Cpu, OwnedTape<Half, Cpu>>, usize), ModelError> {
        let (x, y) = batch(&self.dev, step);
        let mut logits = model.forward_mut(x.to_dtype::<Half>().traced(grads));
        if self.overflow_at == Some(step) {
            logits = logits * Half::from_f32(3000.0);
        }
        Ok((cross_entropy(logits, &y, Default::default())?, 64))
    }
}

fn config(out: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: "mlp".into(),
        preset: "16-8".into(),
        steps,
        batch_size: 64,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 2,
        grad_clip: Some(1.0),
        eval_every: 5,
        checkpoint_every: 5,
        seed: 3,
        device: "cpu".into(),
        dtype: "f16".into(),
        unit: "examples".into(),
        out: out.to_path_buf(),
        progress: false,
        stop_after: None,
        task: serde_json::Value::Null,
    }
}

fn temp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("na-amp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// A mixed-precision run of `steps` (stopping after `stop_after`), with a scaler that grows
/// every 4 steps.
fn run(
    out: &Path,
    steps: usize,
    stop_after: Option<usize>,
    overflow_at: Option<usize>,
    resume: bool,
) -> RunSummary {
    let dev = Cpu::seed_from_u64(5);
    let mut model: Master = dev.build_module::<Mlp, f32>();
    let work = model.to_dtype::<Half>();
    let mut opt: Adam<_, f32, Cpu> = Adam::new(&model, adamw(1e-2, 0.0));
    let mut cfg = config(out, steps);
    cfg.stop_after = stop_after;
    let scaler = GradScaler {
        scale: 1024.0,
        growth_interval: 4,
        ..GradScaler::default()
    };
    let mut task = Classify { dev, overflow_at };
    Trainer::new(cfg)
        .unwrap()
        .run_mixed(&mut task, &mut model, work, &mut opt, scaler, resume)
        .unwrap()
}

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

#[test]
fn mixed_training_learns_skips_overflow_and_resumes_exactly() {
    let (a, b) = (temp("whole"), temp("parts"));
    let whole = run(&a, 20, None, Some(6), false);
    let lines = metrics(&a);
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    let first = steps[0]["loss"].as_f64().unwrap();
    let last = steps[19]["loss"].as_f64().unwrap();
    assert!(last < first * 0.8, "the loss went down: {first} -> {last}");
    // Step 7 (index 6) overflowed: skipped, no gradient norm, and the scale halved after it.
    assert_eq!(steps[6]["skipped"], serde_json::json!(true));
    assert!(steps[6].get("grad_norm").is_none());
    assert_eq!(whole.skipped_steps, 1);
    let scales: Vec<f64> = steps
        .iter()
        .map(|l| l["loss_scale"].as_f64().unwrap())
        .collect();
    // Growth every 4 finite steps from 1024, to the ceiling 2¹⁵ at most; back-off at step 7.
    assert_eq!(
        &scales[..8],
        &[1024.0, 1024.0, 1024.0, 1024.0, 2048.0, 2048.0, 2048.0, 1024.0]
    );
    // 13 finite steps after the back-off: three growths, from 1024 to 8192.
    assert_eq!(whole.loss_scale, Some(8192.0));
    assert!(scales.iter().all(|s| *s <= 32768.0));
    assert!(whole.peak_device_memory_bytes > 0);
    assert_eq!(whole.dtype, "f16");

    // Interrupted after step 9 (mid-interval, after the skip) and resumed: the same run.
    let part = run(&b, 20, Some(9), Some(6), false);
    assert!(part.interrupted && part.steps == 9);
    let rest = run(&b, 20, None, Some(6), true);
    assert_eq!(metrics(&a), metrics(&b));
    assert_eq!(whole.eval, rest.eval);
    assert_eq!(rest.skipped_steps, 1);
    assert_eq!(rest.loss_scale, whole.loss_scale);
}

#[test]
fn a_run_whose_every_step_overflows_stops_with_advice() {
    let out = temp("always");
    let dev = Cpu::seed_from_u64(5);
    let mut model: Master = dev.build_module::<Mlp, f32>();
    let work = model.to_dtype::<Half>();
    let mut opt: Adam<_, f32, Cpu> = Adam::new(&model, adamw(1e-2, 0.0));
    struct Nan(Classify);
    impl Task<Master, f32, Cpu> for Nan {
        fn train_step(
            &mut self,
            m: &mut Master,
            s: usize,
            g: Gradients<f32, Cpu>,
        ) -> Result<StepOutput<f32, Cpu>, ModelError> {
            self.0.train_step(m, s, g)
        }
        fn evaluate(&mut self, m: &mut Master) -> Result<Metrics, ModelError> {
            self.0.evaluate(m)
        }
    }
    impl MixedTask<Work, Cpu> for Nan {
        fn half_loss(
            &mut self,
            m: &mut Work,
            s: usize,
            g: Gradients<Half, Cpu>,
        ) -> Result<(Tensor<Rank0, Half, Cpu, OwnedTape<Half, Cpu>>, usize), ModelError> {
            let (loss, n) = self.0.half_loss(m, s, g)?;
            Ok((loss * Half::NAN, n))
        }
    }
    let mut task = Nan(Classify {
        dev,
        overflow_at: None,
    });
    let err = Trainer::new(config(&out, 100))
        .unwrap()
        .run_mixed(
            &mut task,
            &mut model,
            work,
            &mut opt,
            GradScaler::default(),
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("--dtype f32"), "{err}");
    let skipped = metrics(&out)
        .iter()
        .filter(|l| l.get("skipped").is_some())
        .count();
    assert_eq!(skipped, GradScaler::MAX_SKIPPED_IN_A_ROW);
}

#[test]
fn a_bf16_step_that_overflows_is_found_and_the_scale_stays_at_most_1() {
    let dev = Cpu::seed_from_u64(0);
    let mut master: Master = dev.build_module::<Mlp, f32>();
    let mut work: WorkBf16 = master.to_dtype::<bf16>();
    let (x, y) = batch(&dev, 0);
    let mut grads = master.alloc_grads();
    let out = mixed_step(
        &mut master,
        &mut work,
        &mut grads,
        &bf16::scaler(),
        |h, g| {
            // Logits past bf16's largest value (3.4e38): the loss and its gradients overflow.
            let logits = h.forward_mut(x.clone().to_dtype::<bf16>().traced(g)) * bf16::MAX;
            Ok((
                cross_entropy(logits * bf16::MAX, &y, Default::default())?,
                64,
            ))
        },
    )
    .unwrap();
    assert!(out.found_inf);
    let mut scaler = bf16::scaler();
    scaler.update(true);
    assert_eq!((scaler.scale, scaler.skipped_steps), (0.5, 1));
    let mut scaler = GradScaler {
        growth_interval: 1,
        ..bf16::scaler()
    };
    scaler.update(false);
    assert_eq!(scaler.scale, 1.0, "growth never passes the ceiling of 1");
}
