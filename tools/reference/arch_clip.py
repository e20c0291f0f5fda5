"""Parity reference for `models/src/clip.rs` (llm.c `test_gpt2` style).

Builds Hugging Face `CLIPModel` (transformers 5.x) with the `ClipParity` config and random
weights (fixed seed, eager attention, no dropout, `model.eval()`), runs a batch of 3 image-text
pairs with `return_loss=True`, and writes:

- `models/tests/reference/clip/weights.safetensors`: `model.state_dict()` in f32 (5.x keeps
  the `position_ids` buffers out of it: they are not persistent);
- `models/tests/reference/clip/expected.safetensors`: `input_ids` (int64), `pixel_values`,
  `logits_per_image`, `logits_per_text`, `text_embeds`, `image_embeds` (normalised), `loss`
  (scalar) and `grad.<key>` for every parameter after `loss.backward()`.

The config sets `eos_token_id = 60` (not 2), so the text tower pools at the *first* position of
token 60, and the ids hold larger ids (61..63) before it, which the legacy rule (argmax of the
ids, for `eos_token_id == 2`) would pick instead: the test tells the two rules apart.

    /opt/torch-venv/bin/python tools/reference/arch_clip.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

OUT = pathlib.Path(__file__).resolve().parents[2] / "models/tests/reference/clip"

EOS = 60


def main():
    torch.manual_seed(7)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=8,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            attention_dropout=0.0,
            bos_token_id=0,
            eos_token_id=EOS,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            attention_dropout=0.0,
        ),
        projection_dim=16,
        logit_scale_init_value=2.6592,
    )
    config._attn_implementation = "eager"
    model = CLIPModel(config)
    # Layer norms start at weight 1, bias 0; other values make their gradients more telling.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert not any("position_ids" in k for k in sd), "5.x should not persist position_ids"
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(OUT / "weights.safetensors"))

    # EOS (60) at different positions, larger ids (61..63) before it, padding with EOS after.
    input_ids = torch.tensor(
        [
            [0, 5, 63, 17, EOS, EOS, EOS, EOS],
            [0, 61, 9, 33, 2, 45, 62, EOS],
            [0, EOS, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.int64,
    )
    pixel_values = torch.randn(3, 3, 16, 16)
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    out.loss.backward()
    expected = {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "logits_per_image": out.logits_per_image.detach(),
        "logits_per_text": out.logits_per_text.detach(),
        "text_embeds": out.text_embeds.detach(),
        "image_embeds": out.image_embeds.detach(),
        "loss": out.loss.detach().reshape([]),
    }
    for k, p in model.named_parameters():
        expected[f"grad.{k}"] = p.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in expected.items()}, str(OUT / "expected.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"ClipParity: {n} parameters, loss {out.loss.item():.6f}, {len(sd)} keys")

    # The standard preset's parameter count (ViT-B/32), without building it twice.
    big = CLIPModel(CLIPConfig())
    n = sum(p.numel() for p in big.parameters())
    print("ClipVitB32:", n)
    assert n == 151_277_313


if __name__ == "__main__":
    main()
