"""Reference values for the fused CPU kernels: LayerNorm, Softmax, LogSoftmax, GELU (exact and
tanh), SiLU and ReLU — outputs and the gradients of sum(y * g), in float64.

Rerun: /opt/torch-venv/bin/python tools/reference/fused_cpu.py
Writes: dsl-runtime/tests/reference/fused_cpu.json
"""
import json
import pathlib

import torch

torch.manual_seed(7)
dt = torch.float64
out = pathlib.Path(__file__).resolve().parents[2] / "dsl-runtime/tests/reference/fused_cpu.json"
cases = []


def flat(t):
    return [float(v) for v in t.detach().reshape(-1)]


# LayerNorm(5) on [2, 3, 5]: a constant row (variance 0, eps alone keeps it finite) and a row
# offset by 1e3 (a one-pass E[x²] - E[x]² would lose it).
x = torch.randn(2, 3, 5, dtype=dt)
x[0, 1] = 0.25
x[1, 2] = x[1, 2] + 1e3
x.requires_grad_(True)
ln = torch.nn.LayerNorm(5, eps=1e-5, dtype=dt)
with torch.no_grad():
    ln.weight.copy_(torch.randn(5, dtype=dt))
    ln.bias.copy_(torch.randn(5, dtype=dt))
y = ln(x)
g = torch.randn_like(y)
(y * g).sum().backward()
cases.append(dict(name="layer_norm", shape=list(x.shape), eps=1e-5, x=flat(x), weight=flat(ln.weight),
                  bias=flat(ln.bias), g=flat(g), y=flat(y), grad_x=flat(x.grad),
                  grad_weight=flat(ln.weight.grad), grad_bias=flat(ln.bias.grad)))

# Row-wise and element-wise functions on [3, 6]; the last row has logits near ±1000 so that an
# unstable softmax overflows.
base = torch.randn(3, 6, dtype=dt) * 2.0
base[2] = torch.tensor([1000.0, 999.0, -1000.0, 998.5, 0.0, 1000.0], dtype=dt)
small = torch.randn(3, 6, dtype=dt) * 2.5
fns = {
    "softmax": (base, lambda t: torch.softmax(t, dim=-1)),
    "log_softmax": (base, lambda t: torch.log_softmax(t, dim=-1)),
    "gelu": (small, lambda t: torch.nn.functional.gelu(t)),
    "gelu_tanh": (small, lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
    "silu": (small, lambda t: torch.nn.functional.silu(t)),
    "relu": (small, torch.relu),
}
for name, (inp, fn) in fns.items():
    x = inp.clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    cases.append(dict(name=name, shape=list(x.shape), x=flat(x), g=flat(g), y=flat(y),
                      grad_x=flat(x.grad)))

out.write_text(json.dumps(dict(torch=torch.__version__, cases=cases), indent=1) + "\n")
print(f"wrote {out}")
