"""``torch.multiprocessing`` workers for a test, with a deadline.

``mp.spawn(join=True)`` waits forever for a worker that hangs, and its workers are not daemons,
so a hung pair also keeps the interpreter from exiting when the session ends (a CI run that
printed its summary and then never finished). Here each worker dumps its threads' stacks to
stderr shortly before the deadline, and the test fails with the workers' exit codes and the
environment keys that differ from the session's start, instead of hanging.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp

_SESSION_ENV = dict(os.environ)


def _target(index: int, fn: Callable[..., None], dump_after: float, *args: Any) -> None:
    faulthandler.dump_traceback_later(dump_after, exit=False, file=sys.stderr)
    fn(index, *args)


def spawn(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout: float = 240) -> None:
    """Runs ``fn(rank, *args)`` in ``nprocs`` spawned processes; a worker's exception is raised
    here as ``mp.spawn`` raises it, and a worker still running after ``timeout`` fails the test."""
    ctx = mp.start_processes(_target, args=(fn, max(timeout - 10, 1), *args), nprocs=nprocs,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() < deadline:
            continue
        codes = [p.exitcode for p in ctx.processes]
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(10)
        changed = sorted(k for k in set(os.environ) | set(_SESSION_ENV) if k != "PYTEST_CURRENT_TEST" and os.environ.get(k) != _SESSION_ENV.get(k))
        pytest.fail(f"{fn.__name__}: workers still running after {timeout:.0f} s (exit codes {codes}, None = "
                    f"running; stacks above in stderr); environment keys changed since the session "
                    f"started: {changed}", pytrace=False)
