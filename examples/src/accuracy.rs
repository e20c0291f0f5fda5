//! The numerical accuracy report: how close the layers' outputs are to an `f64` reference, in
//! `f32`, `f16` and `bf16`, and how close the gradients of every layer and loss are to central
//! differences.
//!
//! The original framework published an exact-GELU max error of 1.7e-6 and gradient errors
//! below 3e-3; [`report`] measures ours on the same terms and [`AccuracyReport::comparison`]
//! prints them side by side.

use neural_arch::amp::HalfFloat;
use neural_arch::dfdx::dtypes::{bf16, f16};
use neural_arch::gradcheck::{check_input_grads, check_param_grads, GradReport};
use neural_arch::prelude::*;
use serde::Serialize;

/// Max and root-mean-square error of a function against its `f64` reference.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorStats {
    /// `max |y - y_ref|`.
    pub max_abs_err: f64,
    /// `sqrt(mean (y - y_ref)²)`.
    pub rmse: f64,
    /// Points compared.
    pub points: usize,
}

impl ErrorStats {
    fn of(got: &[f64], want: &[f64]) -> Self {
        let mut max: f64 = 0.0;
        let mut sq = 0.0;
        for (g, w) in got.iter().zip(want) {
            let e = (g - w).abs();
            max = max.max(if e.is_nan() { f64::INFINITY } else { e });
            sq += e * e;
        }
        ErrorStats {
            max_abs_err: max,
            rmse: (sq / got.len().max(1) as f64).sqrt(),
            points: got.len(),
        }
    }
}

/// One function in `f32`, `f16` and `bf16`.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionRow {
    /// What was measured.
    pub name: String,
    /// Computed in `f32`.
    pub f32: ErrorStats,
    /// Computed in `f16` (the reference is taken at the inputs rounded to `f16`).
    pub f16: ErrorStats,
    /// Computed in `bf16` (the reference is taken at the inputs rounded to `bf16`).
    pub bf16: ErrorStats,
}

/// A gradient check of one layer, in `f64`.
#[derive(Debug, Clone, Serialize)]
pub struct GradRow {
    /// The layer.
    pub layer: String,
    /// Parameter gradients (`None` for parameter-free layers).
    pub params: Option<GradStats>,
    /// Input gradient (`None` where the input is not differentiable: token ids).
    pub input: Option<GradStats>,
}

/// The numbers of a [`GradReport`].
#[derive(Debug, Clone, Serialize)]
pub struct GradStats {
    /// Values checked.
    pub checked: usize,
    /// Largest `|analytic - numeric|`.
    pub max_abs_err: f64,
    /// Mean `|analytic - numeric|`.
    pub mean_abs_err: f64,
}

impl From<GradReport> for GradStats {
    fn from(r: GradReport) -> Self {
        GradStats {
            checked: r.checked,
            max_abs_err: r.max_abs_err,
            mean_abs_err: r.mean_abs_err,
        }
    }
}

/// Everything `accuracy-report` writes to `mathematical_accuracy_results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyReport {
    /// The grid the element-wise functions are evaluated on.
    pub grid: String,
    /// Element-wise activations, softmax, and the norms, against `f64`.
    pub precision: Vec<PrecisionRow>,
    /// `max |gelu_tanh - gelu_exact|` in `f64`: the approximation's own error.
    pub gelu_tanh_approximation_max_err: f64,
    /// f32 exact-GELU max error divided by f32 tanh-GELU max error against their own references.
    pub gelu_exact_to_tanh_error_ratio: f64,
    /// Gradient checks: every layer of the library (dense, element-wise, image, sequence) and
    /// every loss.
    pub gradients: Vec<GradRow>,
}

fn gelu_exact(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `layer` on `xs` rounded to the half type `H`, against `reference` at the rounded inputs (so
/// that what is measured is the computation, not the rounding of the grid).
fn half_elementwise<H: HalfFloat, L>(
    layer: &L,
    xs: &[f64],
    reference: &impl Fn(f64) -> f64,
) -> ErrorStats
where
    L: Module<Tensor<(usize,), H, Cpu>, Output = Tensor<(usize,), H, Cpu>>,
{
    let dev = Cpu::default();
    let xh: Vec<H> = xs.iter().map(|&x| H::from_single(x as f32)).collect();
    let want: Vec<f64> = xh.iter().map(|x| reference(wide(*x))).collect();
    let y = Module::<Tensor<(usize,), H, Cpu>>::try_forward(
        layer,
        dev.tensor_from_vec(xh, (xs.len(),)),
    )
    .map(|y| y.as_vec())
    .unwrap_or_default();
    ErrorStats::of(&y.into_iter().map(wide).collect::<Vec<_>>(), &want)
}

/// `x` in `f64` (exact for every float type here).
fn wide<E: num_traits::ToPrimitive>(x: E) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

/// Runs `layer` on `xs` in f32, f16 and bf16 and compares with `reference`.
fn elementwise<L>(name: &str, layer: L, xs: &[f64], reference: impl Fn(f64) -> f64) -> PrecisionRow
where
    L: Module<Tensor<(usize,), f32, Cpu>, Output = Tensor<(usize,), f32, Cpu>>
        + Module<Tensor<(usize,), f16, Cpu>, Output = Tensor<(usize,), f16, Cpu>>
        + Module<Tensor<(usize,), bf16, Cpu>, Output = Tensor<(usize,), bf16, Cpu>>,
{
    let dev = Cpu::default();
    let x32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    // Each reference is taken at the inputs as the dtype holds them, so that what is measured
    // is the computation, not the rounding of the grid.
    let want: Vec<f64> = x32.iter().map(|&x| reference(f64::from(x))).collect();
    let y32 = Module::<Tensor<(usize,), f32, Cpu>>::try_forward(
        &layer,
        dev.tensor_from_vec(x32, (xs.len(),)),
    )
    .map(|y| y.as_vec())
    .unwrap_or_default();
    PrecisionRow {
        name: name.to_string(),
        f32: ErrorStats::of(
            &y32.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            &want,
        ),
        f16: half_elementwise::<f16, _>(&layer, xs, &reference),
        bf16: half_elementwise::<bf16, _>(&layer, xs, &reference),
    }
}

/// Rows of 64 values in the type `E`, normalised by `layer`, against `reference` on each row
/// as `E` holds it.
fn rows_in<E: Dtype + num_traits::ToPrimitive, L>(
    layer: &L,
    rows: &[Vec<f64>],
    reference: &impl Fn(&[f64]) -> Vec<f64>,
    cast: impl Fn(f64) -> E,
) -> ErrorStats
where
    L: Module<Tensor<(usize, Const<64>), E, Cpu>, Output = Tensor<(usize, Const<64>), E, Cpu>>,
{
    let dev = Cpu::default();
    let held: Vec<Vec<E>> = rows
        .iter()
        .map(|r| r.iter().map(|&v| cast(v)).collect())
        .collect();
    let want: Vec<f64> = held
        .iter()
        .flat_map(|r| reference(&r.iter().map(|&v| wide(v)).collect::<Vec<_>>()))
        .collect();
    let x = dev.tensor_from_vec(held.concat(), (rows.len(), Const));
    let y = layer.try_forward(x).map(|y| y.as_vec()).unwrap_or_default();
    ErrorStats::of(&y.into_iter().map(wide).collect::<Vec<_>>(), &want)
}

/// Rows of 64 values, normalised by `layer` in f32, f16 and bf16, against `reference` on each
/// row.
fn rowwise<L>(
    name: &str,
    layer: L,
    rows: &[Vec<f64>],
    reference: impl Fn(&[f64]) -> Vec<f64>,
) -> PrecisionRow
where
    L: Module<Tensor<(usize, Const<64>), f32, Cpu>, Output = Tensor<(usize, Const<64>), f32, Cpu>>
        + Module<Tensor<(usize, Const<64>), f16, Cpu>, Output = Tensor<(usize, Const<64>), f16, Cpu>>
        + Module<
            Tensor<(usize, Const<64>), bf16, Cpu>,
            Output = Tensor<(usize, Const<64>), bf16, Cpu>,
        >,
{
    rowwise_in_each(name, &layer, &layer, &layer, rows, reference)
}

/// A traced `f64` tensor on the CPU, and the scalar every check differentiates.
type Traced<S> = Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>>;
type Loss = Traced<Rank0>;

/// Checks the gradients of `loss(layer, x)` with respect to the layer's trainable parameters
/// (if it has any) and to `x`. `loss` runs the layer and reduces its output to a scalar that
/// depends on every output value ([`SquareSum`]), or is itself a loss; several inputs are
/// sliced out of one `x` so that one check covers all of them.
fn grad_row<M, S: Shape>(
    name: &str,
    mut layer: M,
    x: &Tensor<S, f64, Cpu>,
    loss: impl Fn(&M, Traced<S>) -> Loss,
) -> GradRow
where
    M: TensorCollection<f64, Cpu> + ZeroGrads<f64, Cpu> + NumParams<f64, Cpu>,
{
    let params = (layer.num_trainable_params() > 0)
        .then(|| check_param_grads(&mut layer, |m, g| loss(m, x.trace(g))).into());
    let input = Some(check_input_grads(x, |x| loss(&layer, x)).into());
    GradRow {
        layer: name.to_string(),
        params,
        input,
    }
}

/// Like [`grad_row`] for a layer whose input is not differentiable (token ids): parameters only.
fn param_row<M>(name: &str, mut layer: M, loss: impl Fn(&M, Gradients<f64, Cpu>) -> Loss) -> GradRow
where
    M: TensorCollection<f64, Cpu> + ZeroGrads<f64, Cpu>,
{
    GradRow {
        layer: name.to_string(),
        params: Some(check_param_grads(&mut layer, loss).into()),
        input: None,
    }
}

/// `sum(y²)`: a loss that depends on every output value.
pub trait SquareSum {
    /// The loss.
    fn square_sum(self) -> Tensor<Rank0, f64, Cpu, OwnedTape<f64, Cpu>>;
}

impl<S: Shape> SquareSum for Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>> {
    fn square_sum(self) -> Tensor<Rank0, f64, Cpu, OwnedTape<f64, Cpu>> {
        self.square().sum()
    }
}

/// `sum(f(x)²)` for a module `f`: the loss of the single-input layers.
fn sq<M, S: Shape>(m: &M, x: Traced<S>) -> Loss
where
    M: Module<Traced<S>>,
    M::Output: SquareSum,
    M::Error: std::fmt::Debug,
{
    m.forward(x).square_sum()
}

/// The dense and element-wise layers, on one `[3, 8]` input.
fn dense_rows() -> Vec<GradRow> {
    let x: Tensor<Rank2<3, 8>, f64, Cpu> = Cpu::seed_from_u64(0).sample_normal();
    let dev = Cpu::seed_from_u64(1);
    vec![
        grad_row(
            "Linear<8, 8>",
            dev.build_module::<Linear<8, 8>, f64>(),
            &x,
            sq,
        ),
        grad_row(
            "LinearNoBias<8, 8>",
            dev.build_module::<LinearNoBias<8, 8>, f64>(),
            &x,
            sq,
        ),
        grad_row(
            "LayerNorm<8>",
            dev.build_module::<LayerNorm<8>, f64>(),
            &x,
            sq,
        ),
        grad_row("GELU (exact)", Gelu, &x, sq),
        grad_row("GELU (tanh)", GeluTanh, &x, sq),
        grad_row("SiLU", SiLU, &x, sq),
        grad_row("sigmoid", Sigmoid, &x, sq),
        grad_row("tanh", Tanh, &x, sq),
        grad_row("softmax", Softmax, &x, sq),
        grad_row("log-softmax", LogSoftmax, &x, sq),
    ]
}

/// Convolution, pooling and the image norms, on small NCHW images.
fn image_rows() -> Vec<GradRow> {
    let dev = Cpu::seed_from_u64(2);
    let x: Tensor<Rank4<2, 2, 5, 5>, f64, Cpu> = dev.sample_normal();
    let x4: Tensor<Rank4<1, 4, 4, 4>, f64, Cpu> = dev.sample_normal();
    let mut bn = dev.build_module::<BatchNorm2d<2>, f64>();
    // Away from the initial ones and zeros, so that both parameters are exercised.
    bn.weight = dev.sample_normal();
    bn.bias = dev.sample_normal();
    vec![
        grad_row(
            "Conv2d<2, 3, 3, s2, p1>",
            dev.build_module::<Conv2d<2, 3, 3, 2, 1>, f64>(),
            &x,
            sq,
        ),
        grad_row(
            "Conv2d<4, 4, 3, p1, g2, dil2>",
            dev.build_module::<Conv2d<4, 4, 3, 1, 1, 2, 2>, f64>(),
            &x4,
            sq,
        ),
        grad_row(
            "MaxPool2d<2, s1, p1>",
            MaxPool2d::<2, 1, 1>::default(),
            &x,
            sq,
        ),
        grad_row(
            "AvgPool2d<3, s2, p1>",
            AvgPool2d::<3, 2, 1>::default(),
            &x,
            sq,
        ),
        grad_row("GlobalAvgPool", GlobalAvgPool, &x, sq),
        grad_row(
            "PatchEmbed<4, 3, 2>",
            dev.build_module::<PatchEmbed<4, 3, 2>, f64>(),
            &x4,
            sq,
        ),
        // Training mode: batch statistics, so the gradient flows through the mean and variance.
        // A clone per call keeps the running statistics of the measured module fixed. Its error
        // (about 2e-7) is the central difference's round-off, ε·|loss|/h with a loss near 420,
        // not the gradient's: a Richardson extrapolation (h = 1e-3) agrees with it to 3e-10.
        grad_row("BatchNorm2d<2> (training)", bn, &x, |m, x| {
            m.clone().forward_mut(x).square_sum()
        }),
    ]
}

/// Embeddings, RMSNorm, attention and SwiGLU, on `[B, S, 8]` sequences.
fn sequence_rows() -> Vec<GradRow> {
    let dev = Cpu::seed_from_u64(3);
    let x: Tensor<Rank3<2, 3, 8>, f64, Cpu> = dev.sample_normal();
    // Queries (3 positions) and keys/values (4 positions) of CrossAttention, in one tensor.
    let qkv: Tensor<Rank3<2, 7, 8>, f64, Cpu> = dev.sample_normal();
    // The second sequence has one real token and two padding tokens.
    let mask = dev.tensor([[true, true, true], [true, false, false]]);
    // Sliced out of `qkv`, the keys have a runtime length, and so must their mask.
    let kv_mask = dev.tensor_from_vec(
        vec![true, true, true, true, true, true, false, false],
        (Const::<2>, 4usize),
    );
    let ids = dev.tensor_from_vec(vec![1usize, 4, 1, 0, 2, 4], (2usize, 3usize));
    let mut rms = dev.build_module::<RMSNorm<8>, f64>();
    rms.weight = dev.sample_normal();
    vec![
        // Repeated ids: their rows' gradients are sums.
        param_row(
            "Embedding<5, 8>",
            dev.build_module::<Embedding<5, 8>, f64>(),
            |m, g| m.forward(ids.trace(g)).square_sum(),
        ),
        grad_row(
            "PositionalEmbedding<4, 8>",
            dev.build_module::<PositionalEmbedding<4, 8>, f64>(),
            &x,
            sq,
        ),
        grad_row("RMSNorm<8>", rms, &x, sq),
        grad_row(
            "SelfAttention<8, 2>",
            dev.build_module::<SelfAttention<8, 2>, f64>(),
            &x,
            sq,
        ),
        grad_row(
            "SelfAttention<8, 2> + mask",
            dev.build_module::<SelfAttention<8, 2>, f64>(),
            &x,
            |m, x| m.forward((x, mask.clone())).square_sum(),
        ),
        grad_row(
            "SelfAttention<8, 2, 4, 6>",
            dev.build_module::<SelfAttention<8, 2, 4, 6>, f64>(),
            &x,
            sq,
        ),
        grad_row(
            "CausalSelfAttention<8, 2>",
            dev.build_module::<CausalSelfAttention<8, 2>, f64>(),
            &x,
            sq,
        ),
        grad_row(
            "CrossAttention<8, 2>",
            dev.build_module::<CrossAttention<8, 2>, f64>(),
            &qkv,
            |m, x| {
                let q = x.with_empty_tape().slice((.., 0..3, ..));
                m.forward((q, x.slice((.., 3..7, ..)))).square_sum()
            },
        ),
        grad_row(
            "CrossAttention<8, 2> + mask",
            dev.build_module::<CrossAttention<8, 2>, f64>(),
            &qkv,
            |m, x| {
                let q = x.with_empty_tape().slice((.., 0..3, ..));
                m.forward((q, x.slice((.., 3..7, ..)), kv_mask.clone()))
                    .square_sum()
            },
        ),
        grad_row(
            "GqaAttention<8, 4, 2, 2>",
            dev.build_module::<GqaAttention<8, 4, 2, 2>, f64>(),
            &x,
            sq,
        ),
        grad_row(
            "SwiGLU<8, 6>",
            dev.build_module::<SwiGLU<8, 6>, f64>(),
            &x,
            sq,
        ),
    ]
}

/// The losses, with respect to their inputs (and CLIP's learnt temperature).
fn loss_rows() -> Vec<GradRow> {
    let dev = Cpu::seed_from_u64(4);
    let logits: Tensor<Rank2<4, 5>, f64, Cpu> = dev.sample_normal();
    // Target 0 is the padding id: its row counts neither in the loss nor in the mean.
    let targets = [2usize, 0, 4, 1];
    let options = CrossEntropy {
        ignore_index: Some(0),
        label_smoothing: 0.1,
    };
    let target: Tensor<Rank2<4, 5>, f64, Cpu> = dev.sample_normal();
    let probabilities: Tensor<Rank2<4, 5>, f64, Cpu> = dev.sample_uniform();
    // Image (rows 0..3) and text (rows 3..6) embeddings, in one tensor.
    let pairs: Tensor<Rank2<6, 4>, f64, Cpu> = dev.sample_normal();
    let clip = |m: &LogitScaleModule<f64, Cpu>, x: Traced<Rank2<6, 4>>| {
        let image = x.with_empty_tape().slice((0..3, ..));
        clip_loss(image, x.slice((3..6, ..)), m).expect("matching pairs")
    };
    vec![
        grad_row("cross_entropy (ignore, smoothing)", (), &logits, |_, x| {
            cross_entropy(x, &targets, options).expect("targets in range")
        }),
        grad_row("mse", (), &logits, |_, x| {
            mse(x, target.clone()).expect("same shapes")
        }),
        grad_row("bce_with_logits", (), &logits, |_, x| {
            bce_with_logits(x, probabilities.clone()).expect("same shapes")
        }),
        grad_row(
            "clip_loss",
            dev.build_module::<LogitScale, f64>(),
            &pairs,
            clip,
        ),
    ]
}

/// Measures everything; about 0.1 s in release mode.
pub fn report() -> AccuracyReport {
    let xs: Vec<f64> = (-8000..=8000).map(|i| f64::from(i) * 1e-3).collect();
    let mut precision = vec![
        elementwise("GELU (exact, erf)", Gelu, &xs, gelu_exact),
        elementwise("GELU (tanh approximation)", GeluTanh, &xs, gelu_tanh),
        elementwise("ReLU", ReLU, &xs, |x| x.max(0.0)),
        elementwise("sigmoid", Sigmoid, &xs, sigmoid),
        elementwise("tanh", Tanh, &xs, f64::tanh),
        elementwise("SiLU", SiLU, &xs, |x| x * sigmoid(x)),
    ];
    let approx = xs
        .iter()
        .map(|&x| (gelu_tanh(x) - gelu_exact(x)).abs())
        .fold(0.0, f64::max);
    let ratio = precision[0].f32.max_abs_err / precision[1].f32.max_abs_err;

    // Rows with a spread of scales, as logits and activations have.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let rows: Vec<Vec<f64>> = (0..256)
        .map(|r| {
            let scale = 0.1 + 10.0 * f64::from(r % 16) / 15.0;
            (0..64).map(|_| (next() * 2.0 - 1.0) * scale).collect()
        })
        .collect();
    let softmax_ref = |r: &[f64]| {
        let m = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = r.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect::<Vec<_>>()
    };
    let layer_norm_ref = |r: &[f64]| {
        let n = r.len() as f64;
        let mean = r.iter().sum::<f64>() / n;
        let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        r.iter()
            .map(|v| (v - mean) / (var + 1e-5).sqrt())
            .collect::<Vec<_>>()
    };
    let dev = Cpu::default();
    precision.push(rowwise(
        "softmax (64 logits per row)",
        Softmax,
        &rows,
        softmax_ref,
    ));
    let ln = dev.build_module::<LayerNorm<64>, f32>();
    let ln16 = ln.clone().to_dtype::<f16>();
    let lnb16 = ln.clone().to_dtype::<bf16>();
    precision.push(rowwise_in_each(
        "LayerNorm (64 features)",
        &ln,
        &ln16,
        &lnb16,
        &rows,
        layer_norm_ref,
    ));

    let gradients = [dense_rows(), image_rows(), sequence_rows(), loss_rows()].concat();
    AccuracyReport {
        grid: "16,001 points, -8 to 8 in steps of 0.001".into(),
        precision,
        gelu_tanh_approximation_max_err: approx,
        gelu_exact_to_tanh_error_ratio: ratio,
        gradients,
    }
}

/// Like [`rowwise`] for modules with parameters, built once per dtype.
fn rowwise_in_each<L32, L16, Lb16>(
    name: &str,
    l32: &L32,
    l16: &L16,
    lb16: &Lb16,
    rows: &[Vec<f64>],
    reference: impl Fn(&[f64]) -> Vec<f64>,
) -> PrecisionRow
where
    L32:
        Module<Tensor<(usize, Const<64>), f32, Cpu>, Output = Tensor<(usize, Const<64>), f32, Cpu>>,
    L16:
        Module<Tensor<(usize, Const<64>), f16, Cpu>, Output = Tensor<(usize, Const<64>), f16, Cpu>>,
    Lb16: Module<
        Tensor<(usize, Const<64>), bf16, Cpu>,
        Output = Tensor<(usize, Const<64>), bf16, Cpu>,
    >,
{
    PrecisionRow {
        name: name.to_string(),
        f32: rows_in(l32, rows, &reference, |v| v as f32),
        f16: rows_in(l16, rows, &reference, f16::from_f64),
        bf16: rows_in(lb16, rows, &reference, bf16::from_f64),
    }
}

impl AccuracyReport {
    /// A readable table, with the original framework's published figures beside ours.
    pub fn comparison(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("element-wise functions on {}\n", self.grid));
        out.push_str(&format!(
            "{:<32} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "function", "f32 max", "f32 RMSE", "f16 max", "f16 RMSE", "bf16 max", "bf16 RMSE"
        ));
        for r in &self.precision {
            out.push_str(&format!(
                "{:<32} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e}\n",
                r.name,
                r.f32.max_abs_err,
                r.f32.rmse,
                r.f16.max_abs_err,
                r.f16.rmse,
                r.bf16.max_abs_err,
                r.bf16.rmse
            ));
        }
        out.push_str(&format!(
            "\nGELU tanh approximation vs exact (f64): max {:.2e}; f32 error ratio exact/tanh {:.2}\n",
            self.gelu_tanh_approximation_max_err, self.gelu_exact_to_tanh_error_ratio
        ));
        out.push_str(&format!(
            "\n{:<34} {:>14} {:>14} {:>14}\n",
            "gradient check (f64)", "params max", "params mean", "input max"
        ));
        for g in &self.gradients {
            let (pm, pmean) = match &g.params {
                Some(p) => (
                    format!("{:.2e}", p.max_abs_err),
                    format!("{:.2e}", p.mean_abs_err),
                ),
                None => ("-".into(), "-".into()),
            };
            let input = g
                .input
                .as_ref()
                .map_or_else(|| "-".into(), |i| format!("{:.2e}", i.max_abs_err));
            out.push_str(&format!(
                "{:<34} {:>14} {:>14} {:>14}\n",
                g.layer, pm, pmean, input
            ));
        }
        let gelu = self.precision[0].f32.max_abs_err;
        let worst_grad = self
            .gradients
            .iter()
            .flat_map(|g| {
                g.params
                    .iter()
                    .map(|p| p.max_abs_err)
                    .chain(g.input.iter().map(|i| i.max_abs_err))
            })
            .fold(0.0, f64::max);
        out.push_str(&format!(
            "\nagainst the original framework: exact-GELU max error {gelu:.2e} (was 1.7e-6, {:.0}× tighter); \
             worst gradient error {worst_grad:.2e} (was < 3e-3, {:.0}× tighter)\n",
            1.7e-6 / gelu.max(f64::MIN_POSITIVE),
            3e-3 / worst_grad.max(f64::MIN_POSITIVE)
        ));
        out
    }
}
