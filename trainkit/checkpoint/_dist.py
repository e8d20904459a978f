"""Tiny collective helpers that degrade to no-ops when torch.distributed is not initialised."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def world(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def new_gloo_group(process_group=None, timeout: timedelta | None = None):
    """A gloo group over the ranks of ``process_group`` (default: all). Collective over the
    default group: every rank must call it, in the same order as other ``new_group`` calls."""
    if not initialized():
        return None
    ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
    kw: dict[str, Any] = {"backend": "gloo"}
    if timeout is not None:
        kw["timeout"] = timeout
    return dist.new_group(ranks=ranks, **kw)


def all_gather_object(obj: Any, group=None) -> list[Any]:
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, group=None) -> Any:
    """Rank 0 of ``group``'s ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def all_reduce_max(value: int, group=None) -> int:
    if not initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    if group is None and dist.get_backend() == "nccl":  # the default group may be NCCL-only
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)
