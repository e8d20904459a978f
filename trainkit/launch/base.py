"""What every launcher is: something that runs a job to its end and says how it ended.

The CLI and the sweep only talk to this interface, so a launcher of one's own (a
``pkg.module:Class`` named as ``launcher.name``) runs single jobs and sweeps exactly like
``local`` and ``ray``. A launcher class names its options dataclass as ``Options``; the
config resolves ``launcher.*`` into it and calls its ``check()`` before anything starts.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from trainkit.config import Config, LauncherOptions
from trainkit.errors import EXIT_PREEMPTED, TrainkitError

EXIT_FAILED = 1
EXIT_CONFIG = 2
# The exit codes a job can end with, as a person reads them (anything else: "failed").
STATUS = {0: "done", EXIT_PREEMPTED: "preempted", EXIT_CONFIG: "config error"}


@dataclass(frozen=True)
class JobResult:
    """How one job ended: the CLI's exit code (0/1/2/75) and one line saying why when not 0."""

    exit_code: int
    message: str = ""
    wall_s: float = 0.0

    @property
    def status(self) -> str:
        return STATUS.get(self.exit_code, "failed")


def attempt(start: Callable[[], tuple[int, str]]) -> JobResult:
    """Times ``start`` (a job's whole run); a TrainkitError it raises is the job's result.

    A bad setting or an unreachable cluster found while starting is an outcome like any
    other (exit 2 with its line), so a sweep reports it in its table instead of stopping.
    """
    t0 = time.time()
    try:
        code, message = start()
    except TrainkitError as exc:
        code, message = exc.exit_code, str(exc)
    return JobResult(code, message, time.time() - t0)


def ignore(*args: Any) -> None:
    """The default progress callback of :meth:`Launcher.run_many`."""


class Launcher(abc.ABC):
    """Runs jobs described by validated configs; never raises for how a job ended.

    ``run`` prints what only it can see (a worker's traceback) and returns the one-line
    explanation in :class:`JobResult`; the caller prints that line, once.
    """

    Options: ClassVar[type[LauncherOptions]] = LauncherOptions

    @abc.abstractmethod
    def run(self, cfg: Config) -> JobResult:
        """Runs one job to its end (done, failed, preempted) on this launcher."""

    def run_many(self, cfgs: Sequence[Config], *, started: Callable[[int], None] = ignore,
                 ended: Callable[[int, JobResult], None] = ignore) -> list[JobResult]:
        """Runs every job (a sweep's trials), by default one after the other.

        ``started(i)`` and ``ended(i, result)`` are called around job ``i``; a launcher that
        runs jobs concurrently calls them from its own threads.
        """
        results = []
        for i, cfg in enumerate(cfgs):
            started(i)
            results.append(self.run(cfg))
            ended(i, results[-1])
        return results
