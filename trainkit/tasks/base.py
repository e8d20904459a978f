"""The task protocol: everything recipe-specific that the shared training function needs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainkit import storage
from trainkit.data import write_shards

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    name: str
    # Dataclass whose fields are the recipe's ``model.*`` keys.
    model_config: type
    build_model: Callable[[Any], nn.Module]
    # (model, batch) -> (loss, {"accuracy": ...}); the loss is a scalar mean over the batch.
    loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    # Yields (split, samples) for each split to write into the embedded store.
    samples: Callable[[Any], Iterable[tuple[str, Iterable[dict[str, Any]]]]]
    # Name of the prepared data set in the embedded store, given the model config (the data
    # depend on it: image size, context length).
    dataset: Callable[[Any], str]
    # Tokens in one sample, for tokens/s (0: not a token model).
    tokens_per_sample: Callable[[Any], int] = lambda model_cfg: 0


def store_root() -> str:
    """The embedded object store: a local directory addressed as a ``file://`` URL."""
    root = os.environ.get("TRAINKIT_STORE") or os.path.join(
        os.path.expanduser("~"), ".cache", "trainkit", "store"
    )
    return root


def default_url(task: Task, model_cfg: Any, split: str = "train") -> str:
    return f"file://{os.path.join(store_root(), task.dataset(model_cfg), split)}"


def write_data(task: Task, model_cfg: Any, base_url: str) -> list[str]:
    """Writes each split of the task's data set as shards under ``base_url/<split>``; returns their URLs."""
    urls = []
    for split, samples in task.samples(model_cfg):
        urls.append(storage.join(base_url, split))
        write_shards(samples, urls[-1], shard_bytes=1 << 20)
    return urls
