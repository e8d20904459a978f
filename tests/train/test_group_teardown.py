"""A guarded worker that frees its DDP module right after leaving the group still exits.

torch 2.13's gloo work items carry the thread-local state of the call that queued them, with
a Python object in it; the gloo thread that drops a finished item takes the GIL to release
it. A process group's destructor joins those threads, and it runs on whichever thread drops
the last reference, holding the GIL: a DDP module freed just after the group's last
collective deadlocked the worker (seen as a hang in the parity test, ~1 run in 4 of a plain
DDP loop on this machine; gdb: ``~ProcessGroupGloo`` in ``thread::join`` on the main thread,
``~AsyncAllreduceWork`` -> ``~ThreadLocalState`` -> ``gil_scoped_acquire`` on the gloo thread).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainkit import distributed
from trainkit.distributed import free_port

from spawning import spawn

ROUNDS = 12


def _rounds(rank: int, ports: list[int], teardown: str) -> None:
    with distributed.exit_guard():
        for port in ports:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                              LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
            distributed.init("gloo", threads=1)
            ddp = nn.parallel.DistributedDataParallel(nn.Linear(8, 2))
            ddp(torch.randn(4, 8)).sum().backward()
            if teardown == "shutdown":
                distributed.shutdown()
            else:  # a user's own loop under trainkit.launch, leaving the way plain PyTorch does
                dist.destroy_process_group()
            del ddp  # the group's last reference, moments after its last collective


@pytest.mark.parametrize("teardown", ["shutdown", "destroy"])
def test_freeing_ddp_after_leaving_the_group_does_not_hang(teardown: str) -> None:
    spawn(_rounds, ([free_port() for _ in range(ROUNDS)], teardown), nprocs=2, timeout=90)
