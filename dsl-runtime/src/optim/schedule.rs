//! Learning-rate schedules.

use super::LearningRate;

/// Linear warm-up to `peak_lr`, then cosine decay to `min_lr` at `decay_steps`, then `min_lr`
/// (nanoGPT's `get_lr`, steps counted from 0):
///
/// ```text
/// step < warmup_steps:                  peak_lr · (step + 1) / (warmup_steps + 1)
/// warmup_steps ≤ step < decay_steps:    min_lr + ½·(1 + cos(π·r))·(peak_lr − min_lr),
///                                       r = (step − warmup_steps) / (decay_steps − warmup_steps)
/// step ≥ decay_steps:                   min_lr
/// ```
///
/// The warm-up never gives a learning rate of 0, so no step is wasted. PyTorch has no single
/// equivalent (`LinearLR` then `CosineAnnealingLR` in a `SequentialLR` comes close).
///
/// ```
/// use neural_arch::optim::{Adam, AdamConfig, LearningRate, WarmupCosine};
/// use neural_arch::prelude::*;
///
/// let s = WarmupCosine { peak_lr: 1e-3, min_lr: 1e-4, warmup_steps: 9, decay_steps: 109 };
/// let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
/// assert!(close(s.lr_at(0), 1e-4)); // 1/10 of the peak
/// assert!(close(s.lr_at(9), 1e-3)); // the peak
/// assert!(close(s.lr_at(59), 5.5e-4)); // half-way down
/// assert_eq!(s.lr_at(500), 1e-4);
///
/// let dev = Cpu::default();
/// let model = dev.build_module::<Linear<2, 2>, f32>();
/// let mut opt: Adam<_, f32, Cpu> = Adam::new(&model, AdamConfig::default());
/// let lr = s.apply(&mut opt, 9);
/// assert_eq!(opt.lr(), lr);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// The learning rate at the end of the warm-up.
    pub peak_lr: f64,
    /// The learning rate from `decay_steps` on.
    pub min_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// The step at which the decay reaches `min_lr` (counted from 0, warm-up included).
    pub decay_steps: usize,
}

impl WarmupCosine {
    /// The learning rate of step `step` (from 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let ratio =
            (step - self.warmup_steps) as f64 / (self.decay_steps - self.warmup_steps) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.peak_lr - self.min_lr)
    }

    /// Sets `opt`'s learning rate to that of step `step`, and returns it.
    pub fn apply<O: LearningRate + ?Sized>(&self, opt: &mut O, step: usize) -> f64 {
        let lr = self.lr_at(step);
        opt.set_lr(lr);
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{floats, reference};
    use super::*;

    #[test]
    fn matches_nanogpt_get_lr() {
        let r = &reference()["schedule"];
        let s = WarmupCosine {
            peak_lr: r["peak_lr"].as_f64().unwrap(),
            min_lr: r["min_lr"].as_f64().unwrap(),
            warmup_steps: r["warmup_steps"].as_u64().unwrap() as usize,
            decay_steps: r["decay_steps"].as_u64().unwrap() as usize,
        };
        let steps = r["steps"].as_array().unwrap();
        for (step, want) in steps.iter().zip(floats(&r["lr"])) {
            let got = s.lr_at(step.as_u64().unwrap() as usize);
            assert!((got - want).abs() <= 1e-18, "step {step}: {got} vs {want}");
        }
    }

    #[test]
    fn degenerate_schedules_stay_finite() {
        let s = WarmupCosine {
            peak_lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 5,
            decay_steps: 5,
        };
        assert_eq!(s.lr_at(4), 5.0 / 6.0);
        assert_eq!(s.lr_at(5), 0.1);
        let s = WarmupCosine {
            warmup_steps: 0,
            decay_steps: 0,
            ..s
        };
        assert_eq!(s.lr_at(0), 0.1);
    }
}
