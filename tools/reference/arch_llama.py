"""Parity reference for `models/src/llama.rs`: Hugging Face `LlamaForCausalLM`, tiny config.

Writes, into models/tests/reference/llama/:
- `weights.safetensors`: the model's `state_dict()` in f32 under HF's keys (untied `lm_head`);
- `expected.safetensors`: `input_ids` (int64, [B, T]), `logits` (f32, [B, T, V]), `loss` (f32, [])
  = HF's shifted next-token cross-entropy with `labels = input_ids`, and `grad.<key>` (f32) of
  that loss for every trainable parameter.

The config uses `rms_norm_eps = 1e-5` (TinyLlama's and Llama 2's value, not the RMSNorm layer's
default 1e-6), so the test also checks that the model sets eps. The weights are drawn
explicitly: projections std 0.2 so that query-key products are O(1) and RoPE's rotation
convention shows in the logits, norm weights 1 ± 0.1 so that their layout is exercised,
embeddings std 0.02 (HF's init) so that eps matters in the first norm.

    /opt/torch-venv/bin/python tools/reference/arch_llama.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = pathlib.Path(__file__).resolve().parents[2] / "models/tests/reference/llama"

torch.manual_seed(20261205)
# The `LlamaParity` preset: LlamaForCausalLM<64, 32, 2, 4, 2, 8, 64, 10000>.
config = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    hidden_act="silu",
    max_position_embeddings=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    attn_implementation="eager",
)
model = LlamaForCausalLM(config).float()
model.eval()

with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 0.02)
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.2)

B, T = 2, 8
input_ids = torch.randint(0, config.vocab_size, (B, T), dtype=torch.int64)
out = model(input_ids=input_ids, labels=input_ids)
out.loss.backward()

OUT.mkdir(parents=True, exist_ok=True)
sd = model.state_dict()
weights = {k: v.detach().float().contiguous() for k, v in sd.items()}
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
