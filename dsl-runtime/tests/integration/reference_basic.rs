//! The dense and element-wise layers against PyTorch: outputs and the gradients of `sum(y * g)`
//! with respect to the input and every parameter, in f64, to 1e-12. The values are written by
//! `tools/reference/basic_layers.py` into `tests/reference/basic_layers.json`.

use neural_arch::gradcheck::named_grads;
use neural_arch::prelude::*;
use serde_json::Value;
use std::fmt::Debug;

const TOL: f64 = 1e-12;

/// The case called `name`.
fn case(name: &str) -> Value {
    let file: Value = serde_json::from_str(include_str!("../reference/basic_layers.json"))
        .expect("basic_layers.json parses");
    file["cases"]
        .as_array()
        .expect("a list of cases")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in basic_layers.json"))
        .clone()
}

/// The numbers under `key`.
fn floats(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no list {key} in case {}", v["name"]))
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// Fails with the first values and the max difference when `ours` and `torch` differ by more
/// than [`TOL`].
fn assert_close(what: &str, ours: &[f64], torch: &[f64]) {
    assert_eq!(ours.len(), torch.len(), "{what}: lengths differ");
    let (at, d) = ours
        .iter()
        .zip(torch)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold(
            (0, 0.0),
            |(i, m), (j, d)| if d > m { (j, d) } else { (i, m) },
        );
    assert!(
        d <= TOL,
        "{what}: max |ours - PyTorch| = {d:.3e} > {TOL:.0e} at [{at}]\n ours:  {:?}\n torch: {:?}",
        &ours[..ours.len().min(8)],
        &torch[..torch.len().min(8)]
    );
}

/// Runs `m` on the case's input, backpropagates `sum(y * g)` and compares the output, its shape,
/// the input's gradient and the gradient of every trainable tensor (by checkpoint name `n`,
/// recorded as `grad_<key>` where `key` is `n` with `prefix` removed) with PyTorch's.
fn check<S, O, M>(name: &str, m: &mut M, x_shape: S, prefix: &str)
where
    S: Shape,
    O: Shape,
    M: TensorCollection<f64, Cpu>
        + ZeroGrads<f64, Cpu>
        + Module<
            Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>>,
            Output = Tensor<O, f64, Cpu, OwnedTape<f64, Cpu>>,
        >,
    M::Error: Debug,
{
    let c = case(name);
    let dev = Cpu::default();
    let x = dev.tensor_from_vec(floats(&c, "x"), x_shape);
    let shape: Vec<usize> = x.shape().concrete().into();
    assert_eq!(
        shape,
        floats(&c, "x_shape")
            .iter()
            .map(|&v| v as usize)
            .collect::<Vec<_>>()
    );
    let run = |x| {
        m.try_forward(x)
            .unwrap_or_else(|e| panic!("{name}: forward failed: {e:?}"))
    };
    // A model's gradients keep only its parameters' entries, so the input's gradient comes
    // from a second pass with a leaky tape.
    let y = run(x.trace(m.alloc_grads()));
    let y_shape: Vec<usize> = y.shape().concrete().into();
    assert_eq!(
        y_shape,
        floats(&c, "y_shape")
            .iter()
            .map(|&v| v as usize)
            .collect::<Vec<_>>(),
        "{name}: output shape"
    );
    assert_close(&format!("{name}: forward"), &y.as_vec(), &floats(&c, "y"));
    let g = dev.tensor_from_vec(floats(&c, "g"), *y.shape());
    let grads = (y * g.clone()).sum::<Rank0, _>().backward();
    let input_grads = (run(x.leaky_trace()) * g).sum::<Rank0, _>().backward();
    assert_close(
        &format!("{name}: grad input"),
        &input_grads.get(&x).as_vec(),
        &floats(&c, "grad_x"),
    );
    let params = named_grads(m, &grads);
    for (n, grad) in &params {
        let key = n.strip_prefix(prefix).unwrap_or(n);
        assert_close(
            &format!("{name}: grad {n}"),
            grad,
            &floats(&c, &format!("grad_{key}")),
        );
    }
    // Every parameter PyTorch has, we have, and the other way round.
    let torch_params = c
        .as_object()
        .expect("a case is an object")
        .keys()
        .filter(|k| k.starts_with("grad_") && *k != "grad_x")
        .count();
    assert_eq!(params.len(), torch_params, "{name}: parameter count");
}

#[test]
fn linear_matches_pytorch() {
    let c = case("linear");
    let dev = Cpu::default();
    let mut fc = dev.build_module::<Linear<3, 2>, f64>();
    fc.weight.copy_from(&floats(&c, "weight"));
    fc.bias.copy_from(&floats(&c, "bias"));
    check("linear", &mut fc, Rank3::<2, 2, 3>::default(), "");
    assert_eq!(
        fc.num_trainable_params(),
        <Linear<3, 2> as LayerInfo>::PARAMS
    );
}

#[test]
fn linear_no_bias_matches_pytorch() {
    let c = case("linear_no_bias");
    let dev = Cpu::default();
    let mut fc = dev.build_module::<LinearNoBias<3, 4>, f64>();
    fc.weight.copy_from(&floats(&c, "weight"));
    check("linear_no_bias", &mut fc, Rank2::<2, 3>::default(), "");
}

#[test]
fn layer_norm_matches_pytorch() {
    let c = case("layer_norm");
    let dev = Cpu::default();
    let mut ln = dev.build_module::<LayerNorm<4>, f64>();
    assert_eq!(Some(ln.eps), c["params"]["eps"].as_f64());
    ln.weight.copy_from(&floats(&c, "weight"));
    ln.bias.copy_from(&floats(&c, "bias"));
    // A runtime batch and a fixed feature size, as a model's hidden states have.
    check("layer_norm", &mut ln, (2usize, 3usize, Const::<4>), "");
}

#[test]
fn activations_match_pytorch() {
    let s = Rank2::<2, 8>::default();
    check("relu", &mut ReLU, s, "");
    check("gelu", &mut Gelu, s, "");
    check("gelu_tanh", &mut GeluTanh, s, "");
    check("silu", &mut SiLU, s, "");
    check("sigmoid", &mut Sigmoid, s, "");
    check("tanh", &mut Tanh, s, "");
}

#[test]
fn softmaxes_match_pytorch() {
    check("softmax", &mut Softmax, (3usize, Const::<5>), "");
    check("log_softmax", &mut LogSoftmax, (3usize, Const::<5>), "");
}

#[test]
fn flatten_matches_pytorch() {
    check(
        "flatten",
        &mut Flatten::<6>,
        Rank3::<2, 2, 3>::default(),
        "",
    );
}

#[test]
fn residual_linear_matches_pytorch() {
    let c = case("residual_linear");
    let dev = Cpu::default();
    let mut res = dev.build_module::<Residual<Linear<3, 3>>, f64>();
    res.0.weight.copy_from(&floats(&c, "weight"));
    res.0.bias.copy_from(&floats(&c, "bias"));
    check("residual_linear", &mut res, Rank2::<2, 3>::default(), "0.");
}
