//! Gradients checked against central finite differences, in `f64` on the CPU: the original
//! framework's promise that every gradient is verified numerically, as a tool anyone can use on
//! their own layers (PyTorch's `torch.autograd.gradcheck` has the same idea).
//!
//! ```
//! use neural_arch::gradcheck::{check_input_grads, check_param_grads};
//! use neural_arch::prelude::*;
//!
//! let dev = Cpu::seed_from_u64(0);
//! let mut fc = dev.build_module::<Linear<3, 2>, f64>();
//! let x: Tensor<Rank2<4, 3>, f64, Cpu> = dev.sample_normal();
//! let report = check_param_grads(&mut fc, |m, grads| {
//!     m.forward(x.trace(grads)).tanh().sum::<Rank0, _>()
//! });
//! assert!(report.max_abs_err < 1e-8, "{report}");
//! let report = check_input_grads(&x, |x| fc.forward(x).square().mean::<Rank0, _>());
//! assert!(report.max_abs_err < 1e-8, "{report}");
//! ```

use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorName,
};
use dfdx::nn::ZeroGrads;
use dfdx::shapes::{Rank0, Shape};
use dfdx::tensor::{AsArray, Cpu, Gradients, OwnedTape, Tensor, Trace};
use dfdx::tensor_ops::Backward;
use std::fmt;

/// The step of the central differences: small against the values, large against `f64` noise
/// (the error of `(f(x+h) - f(x-h)) / 2h` is about `h²·f'''` plus `ε·|f| / h`).
pub const STEP: f64 = 1e-6;

/// What a check found.
#[derive(Debug, Clone, PartialEq)]
pub struct GradReport {
    /// Values checked.
    pub checked: usize,
    /// Largest `|analytic - numeric|`.
    pub max_abs_err: f64,
    /// Mean `|analytic - numeric|`.
    pub mean_abs_err: f64,
    /// Where the largest error is: `blocks.0.up.weight[12]` or `input[3]`.
    pub worst: String,
    /// The analytic and numeric values there.
    pub worst_values: (f64, f64),
}

impl fmt::Display for GradReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} values: max |analytic - numeric| {:.2e} at {} ({} vs {}), mean {:.2e}",
            self.checked,
            self.max_abs_err,
            self.worst,
            self.worst_values.0,
            self.worst_values.1,
            self.mean_abs_err
        )
    }
}

#[derive(Default)]
struct Accumulator {
    checked: usize,
    sum: f64,
    report: Option<GradReport>,
}

impl Accumulator {
    fn add(&mut self, at: String, analytic: f64, numeric: f64) {
        let err = (analytic - numeric).abs();
        self.checked += 1;
        self.sum += err;
        let worse = self
            .report
            .as_ref()
            .is_none_or(|r| err > r.max_abs_err || err.is_nan());
        if worse {
            self.report = Some(GradReport {
                checked: 0,
                max_abs_err: err,
                mean_abs_err: 0.0,
                worst: at,
                worst_values: (analytic, numeric),
            });
        }
    }

    fn finish(self) -> GradReport {
        let mut r = self.report.unwrap_or(GradReport {
            checked: 0,
            max_abs_err: 0.0,
            mean_abs_err: 0.0,
            worst: "nothing".into(),
            worst_values: (0.0, 0.0),
        });
        r.checked = self.checked;
        r.mean_abs_err = if self.checked == 0 {
            0.0
        } else {
            self.sum / self.checked as f64
        };
        r
    }
}

/// Every trainable tensor of a module, by dotted name (its checkpoint key), with its values.
pub fn named_values<M: TensorCollection<f64, Cpu>>(m: &mut M) -> Vec<(String, Vec<f64>)> {
    struct Collect(Vec<(String, Vec<f64>)>);
    impl TensorVisitor<f64, Cpu> for Collect {
        type Viewer = (ViewTensorMut, ViewTensorName);
        type Err = std::convert::Infallible;
        type E2 = f64;
        type D2 = Cpu;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, f64, Cpu>,
            (t, name): (&mut Tensor<S, f64, Cpu>, String),
        ) -> Result<Option<Tensor<S, f64, Cpu>>, Self::Err> {
            if opts.do_gradient_update {
                self.0.push((name, t.as_vec()));
            }
            Ok(None)
        }
    }
    let mut c = Collect(Vec::new());
    let walked = M::iter_tensors(&mut RecursiveWalker {
        m: (m, String::new()),
        f: &mut c,
    });
    walked.unwrap_or_else(|e| match e {});
    c.0
}

/// Sets one value of the tensor `name` (trainable tensors only).
fn set_value<M: TensorCollection<f64, Cpu>>(m: &mut M, name: &str, index: usize, value: f64) {
    struct Set<'a> {
        name: &'a str,
        index: usize,
        value: f64,
    }
    impl TensorVisitor<f64, Cpu> for Set<'_> {
        type Viewer = (ViewTensorMut, ViewTensorName);
        type Err = std::convert::Infallible;
        type E2 = f64;
        type D2 = Cpu;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, f64, Cpu>,
            (t, name): (&mut Tensor<S, f64, Cpu>, String),
        ) -> Result<Option<Tensor<S, f64, Cpu>>, Self::Err> {
            if opts.do_gradient_update && name == self.name {
                let mut v = t.as_vec();
                v[self.index] = self.value;
                t.copy_from(&v);
            }
            Ok(None)
        }
    }
    let mut s = Set { name, index, value };
    let walked = M::iter_tensors(&mut RecursiveWalker {
        m: (m, String::new()),
        f: &mut s,
    });
    walked.unwrap_or_else(|e| match e {});
}

/// The gradient of every trainable tensor, by dotted name.
pub fn named_grads<M: TensorCollection<f64, Cpu>>(
    m: &mut M,
    grads: &Gradients<f64, Cpu>,
) -> Vec<(String, Vec<f64>)> {
    struct Collect<'a>(&'a Gradients<f64, Cpu>, Vec<(String, Vec<f64>)>);
    impl TensorVisitor<f64, Cpu> for Collect<'_> {
        type Viewer = (ViewTensorMut, ViewTensorName);
        type Err = std::convert::Infallible;
        type E2 = f64;
        type D2 = Cpu;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, f64, Cpu>,
            (t, name): (&mut Tensor<S, f64, Cpu>, String),
        ) -> Result<Option<Tensor<S, f64, Cpu>>, Self::Err> {
            if opts.do_gradient_update {
                // `alloc_grads` gave every parameter an entry, used or not.
                self.1.push((name, self.0.get(&*t).as_vec()));
            }
            Ok(None)
        }
    }
    let mut c = Collect(grads, Vec::new());
    let walked = M::iter_tensors(&mut RecursiveWalker {
        m: (m, String::new()),
        f: &mut c,
    });
    walked.unwrap_or_else(|e| match e {});
    c.1
}

/// Checks the gradient of a scalar loss with respect to every trainable parameter of `model`.
///
/// `loss(model, grads)` must build the loss with the given gradients on its tape (trace an
/// input with them: `x.trace(grads)`); it is called once for the analytic gradient and twice per
/// parameter value for the central difference, so keep models small.
pub fn check_param_grads<M, F>(model: &mut M, mut loss: F) -> GradReport
where
    M: TensorCollection<f64, Cpu> + ZeroGrads<f64, Cpu>,
    F: FnMut(&M, Gradients<f64, Cpu>) -> Tensor<Rank0, f64, Cpu, OwnedTape<f64, Cpu>>,
{
    let analytic = named_grads(model, &loss(model, model.alloc_grads()).backward());
    let values = named_values(model);
    let mut acc = Accumulator::default();
    for ((name, vals), (_, grad)) in values.iter().zip(&analytic) {
        for (i, (&v, &g)) in vals.iter().zip(grad).enumerate() {
            set_value(model, name, i, v + STEP);
            let plus = loss(model, model.alloc_grads()).array();
            set_value(model, name, i, v - STEP);
            let minus = loss(model, model.alloc_grads()).array();
            set_value(model, name, i, v);
            acc.add(format!("{name}[{i}]"), g, (plus - minus) / (2.0 * STEP));
        }
    }
    acc.finish()
}

/// Checks the gradient of a scalar function of one input tensor.
pub fn check_input_grads<S, F>(x: &Tensor<S, f64, Cpu>, mut f: F) -> GradReport
where
    S: Shape,
    F: FnMut(
        Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>>,
    ) -> Tensor<Rank0, f64, Cpu, OwnedTape<f64, Cpu>>,
{
    let grads = f(x.leaky_trace()).backward();
    let analytic = grads.get(x).as_vec();
    let values = x.as_vec();
    let mut probe = x.clone();
    let mut acc = Accumulator::default();
    for (i, &v) in values.iter().enumerate() {
        let mut shifted = values.clone();
        shifted[i] = v + STEP;
        probe.copy_from(&shifted);
        let plus = f(probe.leaky_trace()).array();
        shifted[i] = v - STEP;
        probe.copy_from(&shifted);
        let minus = f(probe.leaky_trace()).array();
        acc.add(
            format!("input[{i}]"),
            analytic[i],
            (plus - minus) / (2.0 * STEP),
        );
    }
    acc.finish()
}
