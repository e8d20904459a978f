"""Every name trainkit takes from a dependency that the dependency does not export publicly.

Each entry here is used because no public equivalent exists (said per entry), and
``tests/architecture/test_compat.py`` checks that each still exists and behaves as used, so
an upgrade that moves one fails in CI with the name, not at a user's checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

# torch.distributed.checkpoint's fsspec storage classes: DCP's own reader and writer for
# object stores, not re-exported from torch.distributed.checkpoint (torch 2.13).
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter

# The per-item location DCP's planners store in a checkpoint's metadata; a storage layer that
# writes its own files must produce it (no public constructor).
from torch.distributed.checkpoint.filesystem import _StorageInfo as StorageInfo


def hydra_sweep_grid(parsed: list[Any]) -> list[list[str]]:
    """Hydra's own expansion of parsed sweep overrides into trials (choice, range, globs), in
    its order; Hydra exposes it only on its private BasicSweeper (hydra-core 1.3)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return [list(trial) for trial in batch]


def dcp_debug_loggers() -> list[logging.Logger]:
    """DCP's and c10d's module loggers, which log every save at DEBUG even when nobody
    listens; trainkit quiets them only then (no public switch exists)."""
    from torch.distributed import c10d_logger
    from torch.distributed.checkpoint import logger as dcp_logger

    found = [getattr(dcp_logger, "_dcp_logger", None), getattr(c10d_logger, "_c10d_logger", None)]
    return [lg for lg in found if isinstance(lg, logging.Logger)]


def staging_stream(stager) -> object | None:
    """DCP ``DefaultStager``'s copy stream (None off an accelerator or without async staging):
    the checkpointer orders it after the training stream, and torch 2.13 exposes no way to."""
    return stager._staging_stream


_PLAN_CACHES = ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan",
                "_cached_metadata")


def caching_save_planner(key: str):
    """DCP's ``DefaultSavePlanner(enable_plan_caching=True)`` with its class-level caches
    under ``key`` instead of the class name, so that two checkpointers in one process (other
    states, other groups, saving at once from two threads) never use each other's plans.
    torch 2.13 keys them by ``_cached_plans_key`` and offers no way to choose it."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner(enable_plan_caching=True)
    planner._cached_plans_key = key
    return planner


def drop_save_plans(key: str) -> None:
    """Forgets what DCP's planners cached under ``key`` (the caches live as long as the process)."""
    from torch.distributed.checkpoint.planner import SavePlanner

    for name in _PLAN_CACHES:
        getattr(SavePlanner, name).pop(key, None)


__all__ = ["FileSystem", "FsspecReader", "FsspecWriter", "StorageInfo", "caching_save_planner", "dcp_debug_loggers",
           "drop_save_plans", "hydra_sweep_grid", "staging_stream"]



def fsspec_io_loop() -> Any:
    """fsspec's event loop (``fsspec.asyn.loop[0]``: the loop its io thread runs; None until
    first use). fsspec exposes ``get_loop()``, which would start one."""
    import fsspec.asyn

    return fsspec.asyn.loop[0]


def detach_forked_loop(loop: Any) -> None:
    """In a forked child, makes the parent's asyncio loop (copied with the fork) harmless.

    The copy shares the parent's epoll instance. When a child garbage-collects an inherited
    s3fs filesystem, s3fs's finalizer sees the copied loop as running (its ``_thread_id`` came
    along) and closes the connections through it, which removes the *parent's* sockets from
    that shared epoll set: the parent's next request then waits for its read timeout (~16 s
    seen after DataLoader workers ended). Giving the copy a fresh selector and no thread
    makes those closes touch only the child. asyncio has no public way to do this.
    """
    import selectors

    loop._thread_id = None
    old, loop._selector = loop._selector, selectors.DefaultSelector()
    old.close()  # the child's descriptor of the shared epoll instance only
