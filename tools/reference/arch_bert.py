"""Parity reference for BERT (`models/src/bert.rs`), llm.c `test_gpt2` style.

Builds Hugging Face `BertForMaskedLM` with the `BertParity` config (vocab 64, 16 positions,
2 token types, width 32, 2 layers, 2 heads, intermediate 64, LayerNorm eps 1e-12, exact GELU,
dropout 0, eager attention) and random weights from a fixed seed, runs one batch (B = 2, T = 8;
the second sequence padded after 5 tokens through `attention_mask`, two token types, some labels
-100) and writes to `models/tests/reference/bert/`:

- `weights.safetensors`: the checkpoint as `save_pretrained` writes it (f32): the
  `state_dict()` without the tied duplicates `cls.predictions.decoder.{weight,bias}`;
- `expected.safetensors`: `input_ids`, `attention_mask`, `token_type_ids`, `labels` (int64),
  `logits` (f32 [2, 8, 64]), `loss` (f32, shape []) and `grad.<key>` for every tensor of the
  weights file, after `loss.backward()`;
- `weights_cls.safetensors` and `expected_cls.safetensors`: `BertForSequenceClassification`
  (3 labels, with the pooler) on the same batch: its checkpoint and its `logits` [2, 3].

Weights are drawn with std 0.2 (not HF's 0.02) and LayerNorm weights and all biases are
perturbed, so that attention is far from uniform and a wrong scale or mask shows; the head's
transform is scaled down so that its LayerNorm's input variance is ~1e-6 and a wrong eps shows.

    /opt/torch-venv/bin/python tools/reference/arch_bert.py
"""

import os
import pathlib
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

OUT = pathlib.Path(__file__).resolve().parents[2] / "models/tests/reference/bert"

torch.manual_seed(20261205)

config = BertConfig(
    vocab_size=64,
    max_position_embeddings=16,
    type_vocab_size=2,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    attn_implementation="eager",
)


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def saved(model):
    """The checkpoint exactly as `save_pretrained` writes it."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return {k: v.float().contiguous() for k, v in load_file(os.path.join(d, "model.safetensors")).items()}


mlm = BertForMaskedLM(config)
assert mlm.config._attn_implementation == "eager"
randomise(mlm)
# The head's LayerNorm sees a variance ~1e-6, so that eps = 1e-12 and 1e-5 give different
# logits: the test sees a wrong eps.
with torch.no_grad():
    mlm.cls.predictions.transform.dense.weight.mul_(0.005)
    mlm.cls.predictions.transform.dense.bias.mul_(0.005)
mlm.eval()

B, T = 2, 8
input_ids = torch.randint(0, config.vocab_size, (B, T))
attention_mask = torch.ones(B, T, dtype=torch.int64)
attention_mask[1, 5:] = 0
token_type_ids = torch.zeros(B, T, dtype=torch.int64)
token_type_ids[:, 4:] = 1
token_type_ids[1, 5:] = 0
labels = input_ids.clone()
labels[0, [0, 3, 6]] = -100
labels[1, [1, 2]] = -100
labels[1, 5:] = -100  # padding

weights = saved(mlm)
assert "cls.predictions.decoder.weight" not in weights, "HF keeps the tied duplicate?"
out = mlm(
    input_ids=input_ids,
    attention_mask=attention_mask,
    token_type_ids=token_type_ids,
    labels=labels,
)
out.loss.backward()
params = dict(mlm.named_parameters(remove_duplicate=False))
expected = {
    "input_ids": input_ids,
    "attention_mask": attention_mask,
    "token_type_ids": token_type_ids,
    "labels": labels,
    "logits": out.logits.detach().float().contiguous(),
    "loss": out.loss.detach().float().reshape(()),
}
for key in weights:
    assert torch.equal(params[key].detach().float(), weights[key]), key
    expected[f"grad.{key}"] = params[key].grad.float().contiguous()

OUT.mkdir(parents=True, exist_ok=True)
save_file(weights, OUT / "weights.safetensors")
save_file(expected, OUT / "expected.safetensors")

# Sequence classification: the same encoder, with the pooler and a 3-way classifier.
torch.manual_seed(7)
cls_config = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
cls = BertForSequenceClassification(BertConfig(**cls_config, num_labels=3))
randomise(cls)
cls.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
cls.eval()
with torch.no_grad():
    cls_logits = cls(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
    ).logits
save_file(saved(cls), OUT / "weights_cls.safetensors")
save_file({"logits": cls_logits.float().contiguous()}, OUT / "expected_cls.safetensors")

print("loss", out.loss.item(), "logits", tuple(out.logits.shape), "cls logits", cls_logits.tolist())
for f in sorted(OUT.iterdir()):
    print(f.name, f.stat().st_size)
