"""Reference values for Embedding, PositionalEmbedding, RMSNorm and BatchNorm2d.

Writes dsl-runtime/tests/reference/embeddings_norms.json: for each case the input, the
parameters, PyTorch's output, an upstream gradient `g` and PyTorch's gradients of `sum(y * g)`
with respect to the input (when it is a float tensor) and the parameters. BatchNorm2d runs two
training steps and then one evaluation step, and records the running statistics after each
training step. Everything is float64 and drawn from a fixed seed, so a rerun writes the same file.

    /opt/torch-venv/bin/python tools/reference/embeddings_norms.py
"""

import json
import pathlib

import torch

torch.manual_seed(20260102)
torch.set_default_dtype(torch.float64)

OUT = (
    pathlib.Path(__file__).resolve().parents[2]
    / "dsl-runtime/tests/reference/embeddings_norms.json"
)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def backward(y):
    g = torch.randn(*y.shape)
    (y * g).sum().backward()
    return g


def embedding():
    v, d = 5, 3
    m = torch.nn.Embedding(v, d)
    # Repeated ids (1 and 4 twice): their rows' gradients are sums.
    ids = torch.tensor([[1, 4, 1], [0, 2, 4]])
    y = m(ids)
    g = backward(y)
    return {
        "name": "embedding",
        "params": {"vocab": v, "d": d},
        "ids_shape": list(ids.shape),
        "ids": ids.reshape(-1).tolist(),
        "weight": flat(m.weight),
        "y_shape": list(y.shape),
        "y": flat(y),
        "g": flat(g),
        "grad_weight": flat(m.weight.grad),
    }


def positional_embedding():
    # GPT-2's form: x + wpe(arange(T)), with T = 3 < MAX = 4.
    max_len, d = 4, 3
    wpe = torch.nn.Embedding(max_len, d)
    x = torch.randn(2, 3, d, requires_grad=True)
    y = x + wpe(torch.arange(x.shape[1]))
    g = backward(y)
    return {
        "name": "positional_embedding",
        "params": {"max": max_len, "d": d},
        "x_shape": list(x.shape),
        "x": flat(x),
        "weight": flat(wpe.weight),
        "y_shape": list(y.shape),
        "y": flat(y),
        "g": flat(g),
        "grad_x": flat(x.grad),
        "grad_weight": flat(wpe.weight.grad),
    }


def rms_norm():
    d, eps = 4, 1e-6
    m = torch.nn.RMSNorm(d, eps=eps)
    with torch.no_grad():
        m.weight.copy_(torch.randn(d))
    x = torch.randn(2, 3, d)
    # A row whose mean square (about 1e-6) is comparable to eps, so that eps is tested too.
    x[1, 2] *= 1e-3
    x.requires_grad_(True)
    y = m(x)
    g = backward(y)
    return {
        "name": "rms_norm",
        "params": {"d": d, "eps": eps},
        "x_shape": list(x.shape),
        "x": flat(x),
        "weight": flat(m.weight),
        "y_shape": list(y.shape),
        "y": flat(y),
        "g": flat(g),
        "grad_x": flat(x.grad),
        "grad_weight": flat(m.weight.grad),
    }


def batch_norm():
    c = 3
    m = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        m.weight.copy_(torch.randn(c))
        m.bias.copy_(torch.randn(c))
    case = {
        "name": "batch_norm",
        "params": {"c": c, "eps": m.eps, "momentum": m.momentum},
        "weight": flat(m.weight),
        "bias": flat(m.bias),
        "steps": [],
    }
    # Two training steps (the second with shifted, scaled inputs, so the running statistics
    # move visibly), then evaluation on a smaller batch.
    shapes = [((4, c, 2, 3), True, 0.0, 1.0), ((3, c, 3, 2), True, 1.5, 2.0), ((2, c, 2, 2), False, 0.5, 1.0)]
    for shape, training, shift, scale in shapes:
        m.train(training)
        m.zero_grad()
        x = (torch.randn(*shape) * scale + shift).requires_grad_(True)
        y = m(x)
        g = backward(y)
        case["steps"].append(
            {
                "training": training,
                "x_shape": list(x.shape),
                "x": flat(x),
                "y": flat(y),
                "g": flat(g),
                "grad_x": flat(x.grad),
                "grad_weight": flat(m.weight.grad),
                "grad_bias": flat(m.bias.grad),
                "running_mean": flat(m.running_mean),
                "running_var": flat(m.running_var),
            }
        )
    return case


cases = [embedding(), positional_embedding(), rms_norm(), batch_norm()]

# One case per line: small diffs when a case changes, and no line per number.
body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
OUT.write_text(f'{{"torch":{json.dumps(torch.__version__)},"cases":[\n{body}\n]}}\n')
print(f"wrote {len(cases)} cases to {OUT}")
