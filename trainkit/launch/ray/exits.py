"""trainkit's exit codes across Ray: what a worker raises, and what the job's failure means.

A Ray Train worker cannot exit with a code of its own: the function it runs raises, Ray
sends the exception to the controller and, when the group gives up, to the driver inside
a ``TrainingFailedError``. :class:`WorkerExit` carries the code that the local launcher's
worker would have exited with (:func:`trainkit.launch.worker.exit_for`), and
:func:`explain` turns the group's failures back into the job's exit code and one line.
"""

from __future__ import annotations

import re
from typing import Any

from trainkit.errors import EXIT_PREEMPTED
from trainkit.launch.base import EXIT_CONFIG, EXIT_FAILED


class WorkerExit(Exception):
    """A worker's outcome that the driver and Ray's failure policy must tell apart.

    ``exit_code`` as the local launcher would have seen it: 75 preempted, 2 config/store,
    1 anything else trainkit reported. Picklable (Ray sends it to the controller).
    """

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(exit_code, message)
        self.exit_code = exit_code
        self.message = message

    def __str__(self) -> str:
        return f"[exit {self.exit_code}] {self.message}"


# How a WorkerExit reads in the traceback text Ray keeps of a worker's exception.
_RAISED = re.compile(r"WorkerExit: \[exit (\d+)\] (.*)")


def _as_worker_exit(exc: Any) -> WorkerExit | None:
    """The WorkerExit a worker raised, from the exception Ray hands back: the exception
    itself, or (Ray wraps it) the last ``WorkerExit: [exit N] ...`` line of its text."""
    if isinstance(exc, WorkerExit):
        return exc
    found = _RAISED.findall(str(exc))
    return WorkerExit(int(found[-1][0]), found[-1][1].strip()) if found else None


def worker_exits(error: Any) -> dict[int, WorkerExit | None]:
    """rank -> the WorkerExit it raised (None for any other failure, e.g. a dead actor)."""
    failures = getattr(error, "worker_failures", None) or {}
    return {rank: _as_worker_exit(exc) for rank, exc in failures.items()}


def explain(exc: Exception) -> tuple[int, str]:
    """The job's exit code and one line: the first trainkit-reported worker error wins."""
    exits = worker_exits(exc)
    known = sorted((r, e) for r, e in exits.items() if e is not None)
    if known:
        # A config/store error explains the others (peers then only lose a connection).
        rank, first = min(known, key=lambda re: (re[1].exit_code != EXIT_CONFIG, re[1].exit_code == EXIT_FAILED,
                                                  re[0]))
        code = first.exit_code if first.exit_code in (EXIT_CONFIG, EXIT_PREEMPTED) else EXIT_FAILED
        return code, f"worker rank {rank}: {first.message}"
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(err) or type(err).__name__
        return EXIT_FAILED, f"worker rank {rank}: {text.strip().splitlines()[-1]}"
    return EXIT_FAILED, str(exc).strip().splitlines()[-1]
