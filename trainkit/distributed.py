"""Process-group bring-up from the environment a launcher leaves (torchrun, Ray Train)."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainkit.errors import ConfigError


_OWNED = False
_EXIT_CODE: int | None = None
_GUARDED = False
_KEPT: list[Any] = []


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (loopback by default: nothing else is reachable)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_store() -> Any:
    """A master ``TCPStore`` listening on 127.0.0.1 only, on a free port.

    ``TCPStore(host, ...)`` binds every interface whatever ``host`` says; handed a socket we
    bound ourselves (``master_listen_fd``), it listens where that socket does."""
    from torch.distributed import TCPStore

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    return TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach())


def expected_world_size(launcher_world: int) -> int:
    """The processes a run will have: the launcher's (torchrun's, Ray's) WORLD_SIZE once set,
    else what the config's launcher will start."""
    return int(os.environ.get("WORLD_SIZE", launcher_world))


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
        keep_until_exit(dist.group.WORLD)
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


@contextlib.contextmanager
def exit_guard() -> Iterator[None]:
    """Around a worker process's body: the process later leaves without interpreter finalization.

    Gloo's worker threads release a finished collective's tensors on their own; with torch
    2.13 that takes the GIL, and a thread that waits for it while the interpreter starts to
    finalize aborts the whole process ("terminate called without an active exception",
    exit -6), after a run that succeeded (pytorch/pytorch#190489; destroy_process_group does
    not stop those threads while a DDP module still holds the group). So once the body is
    done, the process runs its exit handlers as usual and then ends with ``os._exit`` and
    the exit code the body earned: 0, a ``SystemExit``'s code, or 1 for an exception. A
    ``KeyboardInterrupt`` leaves the process to exit the ordinary way.
    """
    global _EXIT_CODE, _GUARDED
    _GUARDED = True
    try:
        yield
    except SystemExit as exc:
        _EXIT_CODE = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    except Exception:
        _EXIT_CODE = 1
        raise
    else:
        _EXIT_CODE = 0
    finally:
        # Registered last, so it runs first and can still run every other handler.
        atexit.register(_leave)


def keep_until_exit(obj: Any) -> None:
    """In a process under :func:`exit_guard`, holds ``obj`` (a process group) until the process
    leaves, so its destructor never runs; elsewhere does nothing, since a process that ends the
    ordinary way must be able to free it.

    A gloo group's destructor joins gloo's threads on whichever thread drops the last
    reference, holding the GIL, and with torch 2.13 a gloo thread that drops a finished
    collective can be waiting for the GIL (the work item keeps a Python object from the
    caller's thread-local state): a DDP module freed just after its group's last collective
    deadlocked the worker (tests/train/test_group_teardown.py has the stacks).
    """
    if _GUARDED:
        _KEPT.append(obj)


def _leave() -> None:
    if _EXIT_CODE is None:
        return
    atexit.unregister(_leave)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_EXIT_CODE)


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def mean_and_max(means: torch.Tensor, maxes: torch.Tensor) -> tuple[list[float], list[float]]:
    """Averages ``means`` and takes the maximum of ``maxes`` over ranks (1-d float64 tensors on
    the training device): one collective, then one device-to-host transfer."""
    both = torch.cat([means, maxes])
    if not dist.is_initialized():
        rows = [both.tolist()]
    else:
        parts = [torch.empty_like(both) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, both)
        rows = torch.stack(parts).tolist()
    n = means.numel()
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(n)]
    peak = [max(r[n + i] for r in rows) for i in range(maxes.numel())]
    return mean, peak


def is_peer_loss(exc: BaseException) -> bool:
    """A collective that failed because a peer process died (gloo's read/write errors): the
    peer's own error explains the job, and repeating the collective cannot succeed."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        m in text for m in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def world(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def new_gloo_group(process_group=None, timeout: datetime.timedelta | None = None):
    """A gloo group over the ranks of ``process_group`` (default: all). Collective over the
    default group: every rank must call it, in the same order as other ``new_group`` calls."""
    if not initialized():
        return None
    ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
    kw: dict = {"backend": "gloo"}
    if timeout is not None:
        kw["timeout"] = timeout
    group = dist.new_group(ranks=ranks, **kw)
    keep_until_exit(group)
    return group


def all_gather_object(obj, group=None) -> list:
    if not initialized():
        return [obj]
    out: list = [None] * world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj, group=None) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 of ``group``; None on the others.

    For what rank 0 alone reads (a commit's file records): an all-gather would hand each of N
    ranks all N objects (O(world²) bytes), a gather moves each object once.
    """
    if not initialized():
        return [obj]
    out: list | None = [None] * world(group) if rank(group) == 0 else None
    dist.gather_object(obj, out, group=group, group_dst=0)
    return out


def broadcast_object(obj, group=None):
    """Rank 0 of ``group``'s ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]

