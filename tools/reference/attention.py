"""Reference values for the attention family, RoPE and SwiGLU.

Writes dsl-runtime/tests/reference/attention.json. Each case holds its inputs, its parameters
(keyed by their checkpoint names: `w_q.weight`, `c_attn.bias`, `q_proj.weight`, ...), PyTorch's
output `y`, an upstream gradient `g`, and PyTorch's gradients of `sum(y * g)` with respect to
every input and parameter. Everything is float64 and drawn from a fixed seed, so a rerun writes
the same file.

The attention itself is `torch.nn.functional.scaled_dot_product_attention` (boolean masks:
True = attend; a row with every key masked gives 0, which is what neural-arch does too). RoPE
is Hugging Face Llama's `rotate_half` formula, GQA its `repeat_kv`.

    /opt/torch-venv/bin/python tools/reference/attention.py
"""

import json
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(20260102)
torch.set_default_dtype(torch.float64)

OUT = pathlib.Path(__file__).resolve().parents[2] / "dsl-runtime/tests/reference/attention.json"


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()


def linear(i, o, bias=True):
    # PyTorch's nn.Linear initialisation (uniform in ±1/√i), drawn explicitly.
    b = 1.0 / i**0.5
    p = {"weight": (torch.rand(o, i) * 2 * b - b).requires_grad_()}
    if bias:
        p["bias"] = (torch.rand(o) * 2 * b - b).requires_grad_()
    return p


def apply(p, x):
    y = x @ p["weight"].T
    return y + p["bias"] if "bias" in p else y


def case(name, config, inputs, params, forward, masks=None):
    """`params` maps a module name (`w_q`) to {weight, bias}; `forward(**inputs)` gives y."""
    y = forward(**inputs)
    g = torch.randn(*y.shape)
    (y * g).sum().backward()
    flat_params = {f"{m}.{k}": t for m, p in params.items() for k, t in p.items()}
    return {
        "name": name,
        "config": config,
        "inputs": {k: {"shape": list(t.shape), "data": flat(t)} for k, t in inputs.items()},
        "masks": {k: flat_mask for k, flat_mask in (masks or {}).items()},
        "params": {k: {"shape": list(t.shape), "data": flat(t)} for k, t in flat_params.items()},
        "y": {"shape": list(y.shape), "data": flat(y)},
        "g": flat(g),
        "grads": {
            **{k: flat(t.grad) for k, t in inputs.items()},
            **{k: flat(t.grad) for k, t in flat_params.items()},
        },
    }


def heads(x, h):
    b, s, w = x.shape
    return x.view(b, s, h, w // h).transpose(1, 2)


def merge(x):
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def mha(p, q_in, kv_in, h, mask=None):
    """nn.MultiheadAttention's math with separate projections named as neural-arch names them."""
    q = heads(apply(p["w_q"], q_in), h)
    k = heads(apply(p["w_k"], kv_in), h)
    v = heads(apply(p["w_v"], kv_in), h)
    attn_mask = None if mask is None else mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return apply(p["w_o"], merge(o))


def self_attention(name, m, h, b, s, k=None, v=None, mask=None):
    k, v = k or m, v or m
    p = {"w_q": linear(m, k), "w_k": linear(m, k), "w_v": linear(m, v), "w_o": linear(v, m)}
    x = leaf(b, s, m)
    masks = {} if mask is None else {"mask": mask}
    mask_t = None if mask is None else torch.tensor(mask).view(b, s)
    return case(
        name,
        {"m": m, "h": h, "k": k, "v": v},
        {"x": x},
        p,
        lambda x: mha(p, x, x, h, mask_t),
        masks,
    )


def cross_attention(name, m, h, b, s, t, mask=None):
    p = {"w_q": linear(m, m), "w_k": linear(m, m), "w_v": linear(m, m), "w_o": linear(m, m)}
    q, kv = leaf(b, s, m), leaf(b, t, m)
    masks = {} if mask is None else {"mask": mask}
    mask_t = None if mask is None else torch.tensor(mask).view(b, t)
    return case(
        name, {"m": m, "h": h}, {"q": q, "kv": kv}, p, lambda q, kv: mha(p, q, kv, h, mask_t), masks
    )


def causal(name, m, h, b, t):
    # nanoGPT's CausalSelfAttention with nn.Linear c_attn (weight [3M, M]).
    p = {"c_attn": linear(m, 3 * m), "c_proj": linear(m, m)}

    def forward(x):
        q, k, v = apply(p["c_attn"], x).split(m, dim=2)
        o = F.scaled_dot_product_attention(heads(q, h), heads(k, h), heads(v, h), is_causal=True)
        return apply(p["c_proj"], merge(o))

    return case(name, {"m": m, "h": h}, {"x": leaf(b, t, m)}, p, forward)


def rope_tables(s, hd, offset, theta):
    # Hugging Face LlamaRotaryEmbedding, in float64.
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    pos = torch.arange(offset, offset + s, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, offset, theta):
    cos, sin = rope_tables(x.shape[-2], x.shape[-1], offset, theta)
    return x * cos + rotate_half(x) * sin


def rope(name, shape, offset, theta=10000):
    return case(
        name,
        {"hd": shape[-1], "offset": offset, "theta": theta},
        {"x": leaf(*shape)},
        {},
        lambda x: apply_rope(x, offset, theta),
    )


def gqa(name, m, h, kvh, hd, b, t, theta=10000):
    # Hugging Face LlamaAttention: no biases, RoPE on q and k, repeat_kv, causal.
    p = {
        "q_proj": linear(m, h * hd, bias=False),
        "k_proj": linear(m, kvh * hd, bias=False),
        "v_proj": linear(m, kvh * hd, bias=False),
        "o_proj": linear(h * hd, m, bias=False),
    }

    def forward(x):
        q = heads(apply(p["q_proj"], x), h)
        k = heads(apply(p["k_proj"], x), kvh)
        v = heads(apply(p["v_proj"], x), kvh)
        q, k = apply_rope(q, 0, theta), apply_rope(k, 0, theta)
        k = k.repeat_interleave(h // kvh, dim=1)
        v = v.repeat_interleave(h // kvh, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return apply(p["o_proj"], merge(o))

    config = {"m": m, "h": h, "kvh": kvh, "hd": hd, "theta": theta}
    return case(name, config, {"x": leaf(b, t, m)}, p, forward)


def swiglu(name, m, f, shape):
    p = {
        "gate_proj": linear(m, f, bias=False),
        "up_proj": linear(m, f, bias=False),
        "down_proj": linear(f, m, bias=False),
    }

    def forward(x):
        return apply(p["down_proj"], F.silu(apply(p["gate_proj"], x)) * apply(p["up_proj"], x))

    return case(name, {"m": m, "f": f}, {"x": leaf(*shape)}, p, forward)


cases = [
    self_attention("self_attention", 8, 2, 2, 3),
    self_attention("self_attention_kv_widths", 8, 2, 2, 3, k=6, v=4),
    # Example 0 pads its last key; example 1 is all padding (its rows give 0 before w_o).
    self_attention("self_attention_padding", 8, 2, 2, 3, mask=[True, True, False] + [False] * 3),
    causal("causal", 8, 2, 2, 4),
    cross_attention("cross_attention", 8, 2, 2, 3, 4),
    cross_attention("cross_attention_padding", 8, 2, 2, 3, 4, mask=[True] * 3 + [False, True] + [False] * 3),
    gqa("gqa", 8, 4, 2, 4, 2, 4),
    gqa("gqa_kvh_equals_h", 8, 2, 2, 4, 2, 3),
    gqa("gqa_one_kv_head_theta", 8, 4, 1, 2, 1, 5, theta=500000),
    rope("rope", (2, 2, 3, 4), 0),
    rope("rope_offset", (1, 2, 3, 6), 5),
    swiglu("swiglu", 4, 6, (2, 3, 4)),
]

# One case per line: small diffs when a case changes, and no line per number.
body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
OUT.write_text(f'{{"torch":{json.dumps(torch.__version__)},"cases":[\n{body}\n]}}\n')
print(f"wrote {len(cases)} cases to {OUT}")
