//! Element-wise activations and the softmax family. All are parameter-free and accept any shape.

use super::LayerInfo;
use dfdx::nn::{Module, NonMutableModule, ZeroSizedModule};
use dfdx::shapes::{Dtype, Shape};
use dfdx::tensor::{Tape, Tensor, WithEmptyTape};
use dfdx::tensor_ops::{Device, TryAdd, TryMul, TrySub};

macro_rules! activation {
    ($(#[$doc:meta])* $name:ident, |$x:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $name;
        impl ZeroSizedModule for $name {}
        impl NonMutableModule for $name {}
        impl LayerInfo for $name {
            const PARAMS: usize = 0;
        }
        impl<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>> Module<Tensor<S, E, D, T>> for $name {
            type Output = Tensor<S, E, D, T>;
            type Error = D::Err;
            fn try_forward(&self, $x: Tensor<S, E, D, T>) -> Result<Self::Output, D::Err> {
                $body
            }
        }
    };
}

activation!(
    /// `max(0, x)`. PyTorch: `torch.nn.ReLU()`.
    ReLU, |x| x.try_relu()
);
activation!(
    /// Exact GELU, `x·Φ(x) = x/2·(1 + erf(x/√2))`. PyTorch: `torch.nn.GELU()`.
    ///
    /// The gradient is `Φ(x) + x·φ(x)`. dfdx 0.13's `accurate_gelu` computes the value right but
    /// drops the `1/√2` of the chain rule through `erf(x/√2)` in the second term (its gradient
    /// is off by up to 0.22 near |x| = 1, found by `accuracy-report`), so a term whose value is
    /// exactly zero and whose gradient is the missing difference is added:
    /// `k·e(x) - k·e(x)` with `e(x) = exp(-x²/2)`, the first on the tape, the second not, and
    /// `k = 1/√π - 1/√(2π)`.
    Gelu, |x| {
        let k = 1.0 / std::f64::consts::PI.sqrt() - 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        let (k, half) = (E::from_f64(k).unwrap_or_default(), E::from_f64(-0.5).unwrap_or_default());
        let bump = |t: Tensor<S, E, D, T>| -> Result<Tensor<S, E, D, T>, D::Err> {
            t.try_square()?.try_mul(half)?.try_exp()?.try_mul(k)
        };
        let taped = bump(x.with_empty_tape())?;
        let constant = bump(x.with_empty_tape())?.retaped::<T>();
        // `taped - constant` is exactly zero, so the value is dfdx's to the last bit.
        let zero = taped.try_sub(constant)?;
        x.try_accurate_gelu()?.try_add(zero)
    }
);
activation!(
    /// GELU's tanh approximation, `x/2·(1 + tanh(√(2/π)(x + 0.044715x³)))`, as in GPT-2.
    /// PyTorch: `torch.nn.GELU(approximate="tanh")`.
    GeluTanh, |x| x.try_fast_gelu()
);
activation!(
    /// `x·σ(x)`, also called swish. PyTorch: `torch.nn.SiLU()`.
    SiLU, |x| {
        let s = x.retaped::<T>().try_sigmoid()?;
        x.try_mul(s)
    }
);
activation!(
    /// `1 / (1 + e⁻ˣ)`. PyTorch: `torch.nn.Sigmoid()`.
    Sigmoid, |x| x.try_sigmoid()
);
activation!(
    /// `tanh(x)`. PyTorch: `torch.nn.Tanh()`.
    Tanh, |x| x.try_tanh()
);
activation!(
    /// `eˣⁱ / Σⱼ eˣʲ` over the last dimension, computed stably (the maximum is subtracted first).
    /// PyTorch: `torch.nn.Softmax(dim=-1)`.
    Softmax, |x| x.try_softmax::<S::LastAxis>()
);
activation!(
    /// `xᵢ - log Σⱼ eˣʲ` over the last dimension, computed stably.
    /// PyTorch: `torch.nn.LogSoftmax(dim=-1)`.
    LogSoftmax, |x| x.try_log_softmax::<S::LastAxis>()
);

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn activations_match_their_formulas() {
        let dev = Cpu::default();
        let xs = [-2.0f64, -0.5, 0.0, 0.7, 3.0];
        let x = || dev.tensor(xs);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        close(&ReLU.forward(x()).array(), &xs.map(|v| v.max(0.0)));
        close(&SiLU.forward(x()).array(), &xs.map(|v| v * sig(v)));
        close(&Sigmoid.forward(x()).array(), &xs.map(sig));
        close(&Tanh.forward(x()).array(), &xs.map(f64::tanh));
        let c = (2.0 / std::f64::consts::PI).sqrt();
        close(
            &GeluTanh.forward(x()).array(),
            &xs.map(|v| 0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())),
        );
        let sum: f64 = xs.iter().map(|v| v.exp()).sum();
        close(&Softmax.forward(x()).array(), &xs.map(|v| v.exp() / sum));
        close(&LogSoftmax.forward(x()).array(), &xs.map(|v| v - sum.ln()));
        let report =
            crate::gradcheck::check_input_grads(&dev.tensor(xs), |x| Gelu.forward(x).sum());
        assert!(report.max_abs_err < 1e-8, "exact GELU gradient: {report}");
        // Φ(0.7) from a table of the normal distribution: 0.758036347776927.
        let g = Gelu.forward(dev.tensor([0.7f64])).array()[0];
        assert!((g - 0.7 * 0.758_036_347_776_927).abs() < 1e-12);
    }
}
