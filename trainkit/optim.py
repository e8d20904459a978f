"""Optimizer and LR schedule from ``cfg.optim``, built as factories so sharding can come first."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from trainkit.options import positive

if TYPE_CHECKING:
    from trainkit.config import Config


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def check(self, cfg: Config) -> None:
        positive("optim.lr", self.lr)
        positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)



def optimizer_factory(cfg: OptimConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """Params → optimizer; weight decay only on matrices (not biases, norms, embeddings' scale)."""

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        trainable = [p for p in params if p.requires_grad]
        if cfg.weight_decay:
            groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                      {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
        else:
            # Two groups alike would only cost: a step makes one pass over each group, and
            # over FSDP2's DTensors each pass is its own round of dispatches (12 % of a small model's
            # step on CPU; docs/benchmarks/step-distributed-2026-12-01.md). The group keeps the
            # model's order: matrices first, then vectors, made the step 4-20 % slower on CPU
            # (docs/benchmarks/step-distributed-2026-12-02.md).
            groups = [{"params": trainable, "weight_decay": 0.0}]
        if cfg.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)

    return make


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
