"""Parity reference for `models/src/resnet.rs` (llm.c `test_gpt2` style).

Builds two tiny ResNets out of torchvision's own blocks (`torchvision.models.resnet.BasicBlock`
and `Bottleneck`, ResNet v1.5: the stride on the 3x3 conv) and torchvision's `ResNet._make_layer`
and `_forward_impl`, with small widths instead of 64..512 (torchvision's `ResNet` hard-codes
those), so the module tree and the state_dict keys are exactly torchvision's `resnet18` /
`resnet50` ones:

- `basic`      = `ResNetParity`: BasicBlock, layers [2, 2, 2, 2], widths 4/8/8/16, 24x24, 5 classes
- `bottleneck` = `ResNetParityBottleneck`: Bottleneck, layers [1, 2, 1, 1], widths 4/8/8/8
  (outputs 16/32/32/32), 24x24, 5 classes

BatchNorm: the weights get non-trivial running statistics from three training-mode forwards on
random batches before they are saved. Then, on the parity batch:

- `logits`: evaluation mode (`model.eval()`, running statistics);
- `logits_train`, `loss`, `grad.<key>`: training mode (`model.train()`, batch statistics), the
  usual way a training step runs; `loss` = mean cross-entropy against `labels`;
- `running.<bn>.running_mean/var`: the running statistics after that training forward.

Run:

    /opt/torch-venv/bin/python tools/reference/arch_resnet.py

Writes models/tests/reference/resnet/{basic,bottleneck}_{weights,expected}.safetensors.
"""

import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

OUT = pathlib.Path(__file__).resolve().parents[2] / "models/tests/reference/resnet"


class SmallResNet(nn.Module):
    """torchvision's `ResNet` with the stage widths as an argument (same module names)."""

    def __init__(self, block, layers, widths, num_classes):
        super().__init__()
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    _make_layer = ResNet._make_layer
    _forward_impl = ResNet._forward_impl
    forward = ResNet.forward


def build(name, block, layers, widths, seed):
    torch.manual_seed(seed)
    model = SmallResNet(block, layers, widths, num_classes=5)
    # BatchNorm starts at weight 1, bias 0; other values make its gradients more telling.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 24, 24) * 1.5 + 0.3)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(OUT / f"{name}_weights.safetensors"))

    # A batch of 4: with 2, stage 4's batch norm (1x1 images) would estimate each variance from
    # 2 values, so ill-conditioned that PyTorch's own f32 and f64 gradients differ by 4e-4.
    x = torch.randn(4, 3, 24, 24)
    labels = torch.tensor([1, 4, 0, 2], dtype=torch.int64)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    logits_train = model(x)
    loss = F.cross_entropy(logits_train, labels)
    loss.backward()
    expected = {
        "x": x,
        "labels": labels,
        "logits": logits,
        "logits_train": logits_train.detach(),
        "loss": loss.detach().reshape([]),
    }
    for k, p in model.named_parameters():
        expected[f"grad.{k}"] = p.grad.detach().clone()
    for k, v in model.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            expected[f"running.{k}"] = v.detach().clone()
    save_file({k: v.contiguous() for k, v in expected.items()}, str(OUT / f"{name}_expected.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n} parameters, loss {loss.item():.6f}, {len(sd)} state_dict keys")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    build("basic", BasicBlock, [2, 2, 2, 2], [4, 8, 8, 16], seed=1)
    build("bottleneck", Bottleneck, [1, 2, 1, 1], [4, 8, 8, 8], seed=2)
    import torchvision

    for fn, want in [(torchvision.models.resnet18, 11_689_512), (torchvision.models.resnet50, 25_557_032)]:
        n = sum(p.numel() for p in fn().parameters())
        print(fn.__name__, n)
        assert n == want


if __name__ == "__main__":
    main()
