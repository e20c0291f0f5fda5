"""Parity reference for `models/src/gpt2.rs`: Hugging Face `GPT2LMHeadModel`, tiny config.

Writes, into models/tests/reference/gpt2/:
- `weights.safetensors`: the model's `state_dict()` in f32 under HF's keys, as a user's
  checkpoint holds it (the tied `lm_head.weight` left out, as `save_pretrained` does; the
  `attn.bias` causal-mask buffers of older files are not in transformers 5's state dict);
- `expected.safetensors`: `input_ids` (int64, [B, T]), `logits` (f32, [B, T, V]), `loss` (f32, [])
  = HF's shifted next-token cross-entropy with `labels = input_ids`, and `grad.<key>` (f32) of
  that loss for every trainable parameter.

The weights are drawn explicitly (not HF's init, whose std 0.02 leaves attention almost uniform
and biases at zero): projections std 0.2 so that attention patterns are far from uniform,
biases and LayerNorm offsets non-zero so that their layout is exercised, embeddings std 0.02 so
that LayerNorm's eps matters in the first layer.

    /opt/torch-venv/bin/python tools/reference/arch_gpt2.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

OUT = pathlib.Path(__file__).resolve().parents[2] / "models/tests/reference/gpt2"

torch.manual_seed(20261205)
# The `Gpt2Parity` preset: Gpt2LMHeadModel<64, 16, 32, 2, 2, 128>.
config = GPT2Config(
    vocab_size=64,
    n_positions=16,
    n_embd=32,
    n_layer=2,
    n_head=2,
    n_inner=128,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    attn_implementation="eager",
)
model = GPT2LMHeadModel(config).float()
model.eval()

with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith(("wte.weight", "wpe.weight")):
            p.normal_(0.0, 0.02)
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.normal_(0.0, 0.05)
        else:
            p.normal_(0.0, 0.2)

B, T = 2, 8
input_ids = torch.randint(0, config.vocab_size, (B, T), dtype=torch.int64)
out = model(input_ids=input_ids, labels=input_ids)
out.loss.backward()

OUT.mkdir(parents=True, exist_ok=True)
sd = model.state_dict()
# Tied: `lm_head.weight` is `transformer.wte.weight`; HF's files hold only the latter.
weights = {k: v.detach().float().contiguous() for k, v in sd.items() if k != "lm_head.weight"}
save_file(weights, str(OUT / "weights.safetensors"))

expected = {
    "input_ids": input_ids.contiguous(),
    "logits": out.logits.detach().float().contiguous(),
    "loss": out.loss.detach().float().reshape(()).contiguous(),
}
for name, p in model.named_parameters():
    expected[f"grad.{name}"] = p.grad.detach().float().contiguous()
save_file(expected, str(OUT / "expected.safetensors"))
print("weights:", sorted(weights))
print("loss:", float(out.loss.detach()), "grads:", len([k for k in expected if k.startswith("grad.")]))
