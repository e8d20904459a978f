"""CIFAR-style ResNet on scikit-learn's handwritten digits (real images, shipped offline).

The 8x8 digits are upsampled to ``image_size`` and normalised once when the shards are
written, so training reads ready tensors. ``widths``/``blocks`` give the ResNet family:
``blocks=[2,2,2,2]`` is the ResNet-18 layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainkit.tasks.base import Batch, Task


@dataclass
class ResNetConfig:
    width: int = 16
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    image_size: int = 16
    num_classes: int = 10


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, cfg.width, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.width), nn.ReLU())
        layers: list[nn.Module] = []
        cin = cfg.width
        for stage, count in enumerate(cfg.blocks):
            cout = cfg.width * 2**stage
            for i in range(count):
                layers.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(cin, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(cfg: ResNetConfig) -> nn.Module:
    return ResNet(cfg)


def loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(batch["image"])
    label = batch["label"].long()
    accuracy = (logits.argmax(-1) == label).float().mean()
    return F.cross_entropy(logits.float(), label), {"accuracy": accuracy}


def samples(model_cfg: Any) -> Iterable[tuple[str, Iterable[dict[str, Any]]]]:
    from sklearn.datasets import load_digits

    size = model_cfg["image_size"]
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).numpy().astype(np.float32)
    labels = digits.target.astype(np.int64)
    # A fixed, seed-independent split so every run evaluates on the same held-out digits.
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(len(order) * 0.85)

    def split(ids: np.ndarray) -> Iterable[dict[str, Any]]:
        for i in ids:
            yield {"image": images[i], "label": int(labels[i])}

    return [("train", split(order[:cut])), ("eval", split(order[cut:]))]


TASK = Task(
    name="resnet",
    model_config=ResNetConfig,
    build_model=build,
    loss=loss,
    samples=samples,
    dataset=lambda cfg: f"digits-{cfg['image_size']}px",
)
