"""A small decoder-only transformer on real text: this Python's own standard library sources.

Byte-level tokens (vocabulary 256) keep the recipe free of downloads and tokenizers; the
corpus is the sorted ``*.py`` files of the stdlib, cut into ``seq_len + 1`` windows.
"""

from __future__ import annotations

import math
import zlib
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainkit.errors import ConfigError
from trainkit.tasks.base import Batch, Task


# GPT-2's shapes (with this task's 256-byte vocabulary): large enough that building the whole
# model on every rank before sharding it shows in host memory (trainer.meta_init).
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_head": 12, "d_model": 768},          # 85 M parameters
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "d_model": 1024},  # 303 M parameters
    "gpt2-large": {"n_layer": 36, "n_head": 20, "d_model": 1280},   # 709 M parameters
}


@dataclass
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    # Bytes of stdlib source to train on.
    corpus_bytes: int = 4_000_000
    # A named size (PRESETS) setting n_layer, n_head and d_model; "" keeps them as given.
    preset: Literal["", "gpt2", "gpt2-medium", "gpt2-large"] = ""

    def __post_init__(self) -> None:
        for key, value in PRESETS.get(self.preset, {}).items():
            given = getattr(self, key)
            if given not in (value, getattr(GPTConfig, key)):
                raise ConfigError(f"model.{key}={given} contradicts model.preset={self.preset} ({key}={value})")
            setattr(self, key, value)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.n_layer = cfg.n_layer
        if not self.head.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's init. Each tensor is drawn whole from a generator of its own (seeded by
        ``seed``, default ``torch.initial_seed()``, and its name), so a model built on
        ``meta`` and sharded before this runs gets on each rank exactly the shard of the
        weights an eager build gets, holding one whole tensor at a time."""
        from trainkit.strategies.base import copy_full_

        seed = torch.initial_seed() if seed is None else seed
        for prefix, module in self.named_modules():
            for leaf, p in module.named_parameters(recurse=False):
                name = f"{prefix}.{leaf}" if prefix else leaf
                full = torch.empty(p.shape, dtype=p.dtype)
                if isinstance(module, nn.LayerNorm):
                    full.fill_(1.0 if leaf == "weight" else 0.0)
                elif leaf == "bias":
                    full.zero_()
                else:
                    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                    deep = name.endswith(("proj.weight", "mlp.2.weight"))
                    nn.init.normal_(full, std=0.02 / math.sqrt(2 * self.n_layer) if deep else 0.02, generator=g)
                copy_full_(p, full)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(cfg: GPTConfig) -> nn.Module:
    return GPT(cfg)


def loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = batch["tokens"].long()
    logits = model(tokens[:, :-1])
    target = tokens[:, 1:]
    accuracy = (logits.argmax(-1) == target).float().mean()
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)), {
        "accuracy": accuracy
    }


def corpus(limit: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(out)[:limit]


def samples(model_cfg: Any) -> Iterable[tuple[str, Iterable[dict[str, Any]]]]:
    seq = model_cfg["seq_len"] + 1
    text = np.frombuffer(corpus(model_cfg["corpus_bytes"]), dtype=np.uint8)
    windows = len(text) // seq
    cut = int(windows * 0.95)

    def split(lo: int, hi: int) -> Iterator[dict[str, Any]]:
        for i in range(lo, hi):
            yield {"tokens": text[i * seq : (i + 1) * seq].copy()}

    return [("train", split(0, cut)), ("eval", split(cut, windows))]


TASK = Task(
    name="gpt",
    model_config=GPTConfig,
    build_model=build,
    loss=loss,
    samples=samples,
    dataset=lambda cfg: f"pystdlib-{cfg['corpus_bytes']}b-s{cfg['seq_len']}",
    tokens_per_sample=lambda cfg: cfg["seq_len"],
)
