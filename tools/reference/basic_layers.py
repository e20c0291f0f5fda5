"""Reference values for the dense and element-wise layers: Linear, LinearNoBias, LayerNorm, the
activations (ReLU, exact and tanh GELU, SiLU, sigmoid, tanh), softmax and log-softmax over the
last dimension, Flatten, and a residual Linear (`x + fc(x)`).

Writes dsl-runtime/tests/reference/basic_layers.json: for each case the input, the parameters
(row-major, PyTorch's layout: Linear's `weight` is `[out, in]`), PyTorch's output, an upstream
gradient `g` and PyTorch's gradients of `sum(y * g)` with respect to the input and every
parameter. Everything is float64 and drawn from a fixed seed, so a rerun writes the same file.

    /opt/torch-venv/bin/python tools/reference/basic_layers.py
"""

import json
import pathlib

import torch

torch.manual_seed(20260103)
torch.set_default_dtype(torch.float64)

OUT = (
    pathlib.Path(__file__).resolve().parents[2]
    / "dsl-runtime/tests/reference/basic_layers.json"
)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def run(name, module, x, params=None):
    """Runs `module` on `x`, backpropagates `sum(y * g)` and records everything."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(*y.shape)
    (y * g).sum().backward()
    case = {
        "name": name,
        "params": params or {},
        "x_shape": list(x.shape),
        "x": flat(x),
        "y_shape": list(y.shape),
        "y": flat(y),
        "g": flat(g),
        "grad_x": flat(x.grad),
    }
    if isinstance(module, torch.nn.Module):
        for key, p in module.named_parameters():
            case[key] = flat(p)
            case["grad_" + key] = flat(p.grad)
    return case


def linear():
    m = torch.nn.Linear(3, 2)
    # A batch of two sequences: Linear acts on the last dimension only.
    return run("linear", m, torch.randn(2, 2, 3), {"in": 3, "out": 2})


def linear_no_bias():
    m = torch.nn.Linear(3, 4, bias=False)
    return run("linear_no_bias", m, torch.randn(2, 3), {"in": 3, "out": 4})


def layer_norm():
    d = 4
    m = torch.nn.LayerNorm(d)
    # Weight and bias away from their initial ones and zeros, so that both are exercised.
    with torch.no_grad():
        m.weight.copy_(torch.randn(d))
        m.bias.copy_(torch.randn(d))
    x = torch.randn(2, 3, d) * 2.0 + 0.5
    return run("layer_norm", m, x, {"d": d, "eps": m.eps})


# Values across the interesting ranges of the activations: large negative and positive (the
# saturated tails), near zero, and the middle. No exact zero: ReLU's derivative there is a
# convention.
ACT_X = torch.tensor(
    [
        [-9.0, -4.5, -2.25, -1.3, -0.7, -0.2, -1e-3, 2e-3],
        [0.15, 0.45, 0.9, 1.2, 1.9, 3.1, 5.5, 10.0],
    ]
)


def activations():
    f = torch.nn.functional
    acts = [
        ("relu", torch.relu),
        ("gelu", lambda x: f.gelu(x)),
        ("gelu_tanh", lambda x: f.gelu(x, approximate="tanh")),
        ("silu", f.silu),
        ("sigmoid", torch.sigmoid),
        ("tanh", torch.tanh),
    ]
    return [run(name, fn, ACT_X) for name, fn in acts]


def softmaxes():
    # Rows with small and large logits: the large ones check the max subtraction.
    x = torch.randn(3, 5)
    x[1] *= 10.0
    x[2] += 30.0
    return [
        run("softmax", lambda t: torch.softmax(t, dim=-1), x),
        run("log_softmax", lambda t: torch.log_softmax(t, dim=-1), x),
    ]


def flatten():
    return run("flatten", torch.nn.Flatten(), torch.randn(2, 2, 3), {"n": 6})


class ResidualLinear(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        # Named `0` as in our checkpoints (`res.0.weight`); recorded as `weight` and `bias`.
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(x)


def residual_linear():
    m = ResidualLinear(3)
    case = run("residual_linear", m, torch.randn(2, 3), {"d": 3})
    for key in ["weight", "bias"]:
        case[key] = case.pop("fc." + key)
        case["grad_" + key] = case.pop("grad_fc." + key)
    return case


cases = [
    linear(),
    linear_no_bias(),
    layer_norm(),
    *activations(),
    *softmaxes(),
    flatten(),
    residual_linear(),
]

# One case per line: small diffs when a case changes, and no line per number.
body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
OUT.write_text(f'{{"torch":{json.dumps(torch.__version__)},"cases":[\n{body}\n]}}\n')
print(f"wrote {len(cases)} cases to {OUT}")
