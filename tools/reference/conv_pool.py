"""Reference values for Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool and PatchEmbed.

Writes dsl-runtime/tests/reference/conv_pool.json: for each case the input, the parameters,
PyTorch's output, an upstream gradient `g` and PyTorch's gradients of `sum(y * g)` with respect
to the input and the parameters. Everything is float64 and drawn from a fixed seed, so a rerun
writes the same file (up to the last printed digit of repr).

    /opt/torch-venv/bin/python tools/reference/conv_pool.py
"""

import json
import pathlib

import torch

torch.manual_seed(20260101)
torch.set_default_dtype(torch.float64)

OUT = pathlib.Path(__file__).resolve().parents[2] / "dsl-runtime/tests/reference/conv_pool.json"


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def run(name, module, x_shape, forward=None, **params):
    x = torch.randn(*x_shape, requires_grad=True)
    y = forward(module, x) if forward else module(x)
    g = torch.randn(*y.shape)
    (y * g).sum().backward()
    case = {
        "name": name,
        "params": params,
        "x_shape": list(x.shape),
        "x": flat(x),
        "y_shape": list(y.shape),
        "y": flat(y),
        "g": flat(g),
        "grad_x": flat(x.grad),
    }
    weight = getattr(module, "weight", None)
    if weight is not None:
        case["weight_shape"] = list(weight.shape)
        case["weight"] = flat(weight)
        case["grad_weight"] = flat(weight.grad)
    bias = getattr(module, "bias", None)
    if bias is not None:
        case["bias"] = flat(bias)
        case["grad_bias"] = flat(bias.grad)
    return case


def conv(name, ci, co, k, x_shape, s=1, p=0, dil=1, g=1, bias=True):
    m = torch.nn.Conv2d(ci, co, k, stride=s, padding=p, dilation=dil, groups=g, bias=bias)
    return run(name, m, x_shape, ci=ci, co=co, k=k, s=s, p=p, dil=dil, g=g, bias=bias)


def patch_embed(module, x):
    # Hugging Face ViTPatchEmbeddings: projection, then flatten(2).transpose(1, 2).
    return module(x).flatten(2).transpose(1, 2)


def global_avg(module, x):
    return module(x).flatten(1)


cases = [
    conv("conv_basic", 2, 3, 3, (2, 2, 5, 4), p=1),
    conv("conv_strided_dilated", 2, 4, 3, (1, 2, 7, 6), s=2, p=2, dil=2),
    conv("conv_grouped", 4, 6, 3, (2, 4, 4, 5), p=1, g=2),
    conv("conv_depthwise", 3, 3, 3, (1, 3, 6, 5), s=2, p=1, g=3),
    conv("conv_no_bias", 2, 3, 2, (1, 2, 4, 4), bias=False),
    run("max_pool", torch.nn.MaxPool2d(3, stride=2, padding=1), (2, 2, 6, 5), k=3, s=2, p=1),
    run("max_pool_default_stride", torch.nn.MaxPool2d(2), (1, 2, 5, 4), k=2, s=2, p=0),
    run("avg_pool", torch.nn.AvgPool2d(3, stride=2, padding=1), (2, 2, 6, 5), k=3, s=2, p=1),
    run("avg_pool_overlap", torch.nn.AvgPool2d(2, stride=1), (1, 2, 3, 4), k=2, s=1, p=0),
    run("global_avg_pool", torch.nn.AdaptiveAvgPool2d(1), (2, 3, 4, 5), forward=global_avg),
    run("patch_embed", torch.nn.Conv2d(3, 4, 2, stride=2), (2, 3, 4, 6), forward=patch_embed,
        c=3, d=4, p=2),
]

# One case per line: small diffs when a case changes, and no line per number.
body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
OUT.write_text(f'{{"torch":{json.dumps(torch.__version__)},"cases":[\n{body}\n]}}\n')
print(f"wrote {len(cases)} cases to {OUT}")
