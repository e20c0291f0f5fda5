"""Parity reference for the Vision Transformer (`models/src/vit.rs`), llm.c `test_gpt2` style.

Builds Hugging Face `ViTForImageClassification` with the `VitParity` config (16×16 RGB images,
patch 4 so 16 patches + the class token, width 32, 2 layers, 2 heads, intermediate 64, 5
classes, LayerNorm eps 1e-12, exact GELU, dropout 0, eager attention) and random weights from a
fixed seed, runs one batch of B = 2 images with labels, and writes to
`models/tests/reference/vit/`:

- `weights.safetensors`: the checkpoint as `save_pretrained` writes it (f32). transformers 5
  renames ViT's modules (`vit.layers.0.attention.q_proj`, ...) but loads and saves the
  original layout of the Hub checkpoints (`vit.encoder.layer.0.attention.attention.query`,
  ...), which is what users have; the model in Rust uses those names;
- `expected.safetensors`: `pixel_values` (f32 [2, 3, 16, 16]), `labels` (int64), `logits`
  (f32 [2, 5]), `loss` (f32, shape []) and `grad.<key>` for every tensor of the weights file
  (under its checkpoint name), after `loss.backward()`.

Weights are drawn with std 0.2 (not HF's 0.02) and LayerNorm weights and all biases are
perturbed, so that attention is far from uniform and a wrong scale shows; the embeddings are
scaled down so that the first LayerNorm's input variance is ~1e-6 and a wrong eps shows.

    /opt/torch-venv/bin/python tools/reference/arch_vit.py
"""

import os
import pathlib
import re
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

OUT = pathlib.Path(__file__).resolve().parents[2] / "models/tests/reference/vit"

torch.manual_seed(20261206)

config = ViTConfig(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=5,
    attn_implementation="eager",
)
model = ViTForImageClassification(config)
assert model.config._attn_implementation == "eager"

with torch.no_grad():
    for name, p in model.named_parameters():
        if "layernorm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(0.2 * torch.randn_like(p))
    # The embeddings are scaled down so that the first LayerNorm sees a variance ~1e-6, where
    # eps = 1e-12 and 1e-5 give different outputs: the test sees a wrong eps.
    emb = model.vit.embeddings
    for p in [emb.cls_token, emb.position_embeddings, *emb.patch_embeddings.parameters()]:
        p.mul_(0.005)
model.eval()

with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    weights = {
        k: v.float().contiguous() for k, v in load_file(os.path.join(d, "model.safetensors")).items()
    }


def module_name(key):
    """The transformers 5 parameter name of a checkpoint key (its `ViTModel` renamings)."""
    key = re.sub(r"encoder\.layer\.", "layers.", key)
    for old, new in [
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ]:
        key = key.replace(old, new)
    return key


params = dict(model.named_parameters())
assert sorted(module_name(k) for k in weights) == sorted(params), "unexpected checkpoint layout"

B = 2
pixel_values = torch.randn(B, 3, 16, 16)
labels = torch.tensor([1, 3])
out = model(pixel_values=pixel_values, labels=labels)
out.loss.backward()

expected = {
    "pixel_values": pixel_values.float().contiguous(),
    "labels": labels,
    "logits": out.logits.detach().float().contiguous(),
    "loss": out.loss.detach().float().reshape(()),
}
for key in weights:
    p = params[module_name(key)]
    assert torch.equal(p.detach().float(), weights[key]), key
    expected[f"grad.{key}"] = p.grad.float().contiguous()

OUT.mkdir(parents=True, exist_ok=True)
save_file(weights, OUT / "weights.safetensors")
save_file(expected, OUT / "expected.safetensors")
print("loss", out.loss.item(), "logits", out.logits.tolist())
for f in sorted(OUT.iterdir()):
    print(f.name, f.stat().st_size)
