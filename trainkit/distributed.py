"""Process-group bring-up from the environment a launcher leaves (torchrun, Ray Train)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainkit.errors import ConfigError


_OWNED = False


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def pick_backend(requested: str) -> str:
    if requested != "auto":
        if requested == "nccl" and not torch.cuda.is_available():
            raise ConfigError("strategy.backend=nccl needs CUDA GPUs; none is visible (use gloo or auto)")
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(backend: str = "auto", *, threads: int = 0) -> DistInfo:
    """Joins the process group described by RANK/WORLD_SIZE/MASTER_*; alone when unset."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    _set_threads(threads, local_world)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    chosen = None
    if dist.is_initialized():  # e.g. Ray Train set the group up before calling us
        chosen = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
    elif "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        chosen = pick_backend(backend)
        global _OWNED
        _OWNED = True
        dist.init_process_group(
            chosen,
            timeout=datetime.timedelta(seconds=int(os.environ.get("TRAINKIT_PG_TIMEOUT", 600))),
            device_id=device if chosen == "nccl" else None,
        )
    return DistInfo(rank, world, local_rank, local_world, device, chosen)


def _set_threads(threads: int, local_world: int) -> None:
    # torchrun pins OMP_NUM_THREADS=1; split the cores between local workers instead.
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)


def shutdown() -> None:
    """Leaves the group if we made it; a group Ray (or the user) made is theirs to end."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        # No rank tears down its connections while a peer still talks to it.
        dist.barrier()
        dist.destroy_process_group()
    _OWNED = False


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Averages a few scalars over ranks in one collective."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def agree(stop: bool, save: bool, device: torch.device) -> tuple[bool, bool]:
    """One collective per step: does any rank want to stop, or to save (clocks differ)?"""
    if not dist.is_initialized():
        return stop, save
    t = torch.tensor([float(stop), float(save)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item()), bool(t[1].item())
