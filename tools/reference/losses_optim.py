"""Reference values for the losses, optimizers, gradient clipping and the LR schedule.

Writes two files under dsl-runtime/tests/reference/:

- losses.json: cross_entropy (2-D logits with an out-of-range ignore index and label smoothing;
  3-D logits with an in-range ignore index and label smoothing; plain), mse, bce_with_logits
  (with logits of large magnitude), CLIP's symmetric InfoNCE loss. For each: the inputs, PyTorch's
  loss and its gradients with respect to every float input.
- optim.json: a Linear(3, 2) trained for three steps on a fixed batch with the loss
  mean((x W^T + b - y)^2), by torch.optim.SGD (plain; momentum and weight decay; Nesterov),
  Adam (L2 weight decay), AdamW and Lion (the paper's rule, written below in NumPy since PyTorch
  has no Lion), recording the parameters after each step and the final optimizer state;
  torch.nn.utils.clip_grad_norm_ on that model's first gradients; the warm-up + cosine schedule
  at a few steps (nanoGPT's get_lr).

Everything is float64 and drawn from a fixed seed, so a rerun writes the same files.

    /opt/torch-venv/bin/python tools/reference/losses_optim.py
"""

import json
import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

torch.manual_seed(20260311)
torch.set_default_dtype(torch.float64)

REF = pathlib.Path(__file__).resolve().parents[2] / "dsl-runtime/tests/reference"


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Losses


def cross_entropy_case(name, logits, targets, ignore_index, label_smoothing):
    c = logits.shape[-1]
    loss = F.cross_entropy(
        logits.reshape(-1, c),
        torch.tensor(targets),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    loss.backward()
    return {
        "name": name,
        "shape": list(logits.shape),
        "logits": flat(logits),
        "targets": targets,
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "loss": loss.item(),
        "grad": flat(logits.grad),
    }


def losses():
    out = {}
    # 2-D: the ignore index (100) is outside 0..C, as PyTorch's -100 is; rows 1 and 4 ignored.
    out["ce_2d"] = cross_entropy_case(
        "ce_2d", leaf(6, 5, scale=2.0), [3, 100, 0, 4, 100, 2], 100, 0.1
    )
    # 3-D (B=2, T=3, C=4), a padding id inside 0..C ignored (0), heavier smoothing.
    out["ce_3d"] = cross_entropy_case(
        "ce_3d", leaf(2, 3, 4, scale=2.0), [1, 0, 3, 2, 2, 0], 0, 0.2
    )
    out["ce_plain"] = cross_entropy_case(
        "ce_plain", leaf(4, 3, scale=3.0), [2, 0, 1, 1], -100, 0.0
    )

    pred, target = leaf(3, 4), torch.randn(3, 4)
    loss = F.mse_loss(pred, target)
    loss.backward()
    out["mse"] = {
        "shape": [3, 4],
        "pred": flat(pred),
        "target": flat(target),
        "loss": loss.item(),
        "grad": flat(pred.grad),
    }

    logits = torch.tensor(
        [[-40.0, -3.0, -0.5, 0.0], [0.25, 2.0, 35.0, 7.5]], requires_grad=True
    )
    probs = torch.tensor([[0.0, 1.0, 0.3, 0.5], [1.0, 0.0, 0.9, 1.0]])
    loss = F.binary_cross_entropy_with_logits(logits, probs)
    loss.backward()
    out["bce"] = {
        "shape": [2, 4],
        "logits": flat(logits),
        "targets": flat(probs),
        "loss": loss.item(),
        "grad": flat(logits.grad),
    }

    img, txt = leaf(4, 3), leaf(4, 3)
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    i = img / img.norm(dim=1, keepdim=True)
    t = txt / txt.norm(dim=1, keepdim=True)
    logits_per_image = scale.exp() * i @ t.t()
    labels = torch.arange(4)
    loss = (
        F.cross_entropy(logits_per_image, labels)
        + F.cross_entropy(logits_per_image.t(), labels)
    ) / 2
    loss.backward()
    out["clip"] = {
        "n": 4,
        "d": 3,
        "image": flat(img),
        "text": flat(txt),
        "logit_scale": scale.item(),
        "loss": loss.item(),
        "grad_image": flat(img.grad),
        "grad_text": flat(txt.grad),
        "grad_logit_scale": scale.grad.item(),
    }
    return out


# ---------------------------------------------------------------------------------------------
# Optimizers

W0 = torch.randn(2, 3)
B0 = torch.randn(2)
X = torch.randn(4, 3)
Y = torch.randn(4, 2)
STEPS = 3


def fresh_model():
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.copy_(W0)
        m.bias.copy_(B0)
    return m


def model_loss(m):
    return ((m(X) - Y) ** 2).mean()


def run_torch(name, make_opt, state_keys):
    m = fresh_model()
    opt = make_opt(m.parameters())
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        model_loss(m).backward()
        opt.step()
        history.append({"weight": flat(m.weight), "bias": flat(m.bias)})
    state = {}
    for pname, p in (("weight", m.weight), ("bias", m.bias)):
        for key in state_keys:
            state[f"{pname}.{key}"] = flat(opt.state[p][key])
    return {"name": name, "history": history, "state": state}


def run_lion(lr, betas, wd):
    """Lion (Chen et al. 2023, https://arxiv.org/abs/2302.06675, Algorithm 2) in NumPy."""
    b1, b2 = betas
    m = fresh_model()
    exp_avg = {"weight": np.zeros((2, 3)), "bias": np.zeros(2)}
    history = []
    for _ in range(STEPS):
        m.zero_grad()
        model_loss(m).backward()
        with torch.no_grad():
            for pname, p in (("weight", m.weight), ("bias", m.bias)):
                theta = p.detach().numpy().copy()
                g = p.grad.detach().numpy()
                c = b1 * exp_avg[pname] + (1 - b1) * g
                theta = theta * (1 - lr * wd) - lr * np.sign(c)
                exp_avg[pname] = b2 * exp_avg[pname] + (1 - b2) * g
                p.copy_(torch.from_numpy(theta))
        history.append({"weight": flat(m.weight), "bias": flat(m.bias)})
    state = {f"{k}.exp_avg": [float(v) for v in a.reshape(-1)] for k, a in exp_avg.items()}
    return {"name": "lion", "history": history, "state": state}


def optim():
    cases = [
        run_torch("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1), []),
        run_torch(
            "sgd_momentum",
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
            ["momentum_buffer"],
        ),
        run_torch(
            "sgd_nesterov",
            lambda ps: torch.optim.SGD(
                ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
            ),
            ["momentum_buffer"],
        ),
        run_torch(
            "adam",
            lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
            ["exp_avg", "exp_avg_sq"],
        ),
        run_torch(
            "adamw",
            lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
            ["exp_avg", "exp_avg_sq"],
        ),
        run_lion(lr=0.01, betas=(0.9, 0.99), wd=0.1),
    ]

    m = fresh_model()
    model_loss(m).backward()
    grads = {"weight": flat(m.weight.grad), "bias": flat(m.bias.grad)}
    clip = []
    for max_norm in (0.5, 100.0):
        for p, g in ((m.weight, grads["weight"]), (m.bias, grads["bias"])):
            p.grad = torch.tensor(g).reshape(p.shape)
        total = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
        clip.append(
            {
                "max_norm": max_norm,
                "total_norm": float(total),
                "weight": flat(m.weight.grad),
                "bias": flat(m.bias.grad),
            }
        )

    # nanoGPT's get_lr (train.py), with warmup 10 and decay ending at step 100.
    peak, floor, warmup, decay = 6e-4, 6e-5, 10, 100

    def get_lr(it):
        if it < warmup:
            return peak * (it + 1) / (warmup + 1)
        if it > decay:
            return floor
        ratio = (it - warmup) / (decay - warmup)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return floor + coeff * (peak - floor)

    steps = [0, 1, 5, 9, 10, 11, 33, 55, 99, 100, 101, 1000]
    schedule = {
        "peak_lr": peak,
        "min_lr": floor,
        "warmup_steps": warmup,
        "decay_steps": decay,
        "steps": steps,
        "lr": [get_lr(s) for s in steps],
    }

    return {
        "w0": flat(W0),
        "b0": flat(B0),
        "x": flat(X),
        "y": flat(Y),
        "steps": STEPS,
        "cases": cases,
        "clip": {"grads": grads, "cases": clip},
        "schedule": schedule,
    }


def write(name, obj):
    path = REF / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    write("losses.json", losses())
    write("optim.json", optim())
