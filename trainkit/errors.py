"""Errors a user can act on.

Everything trainkit raises on purpose derives from ``TrainkitError`` so the launcher can
print one readable line instead of a traceback; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class TrainkitError(Exception):
    """Base class: the message is meant for the user, alone on one line."""

    exit_code = 1


class ConfigError(TrainkitError):
    """Bad configuration, found before any worker starts (exit code 2, like argparse)."""

    exit_code = 2


class StorageError(TrainkitError):
    """A store or path cannot be used: missing bucket, no credentials, corrupt object."""

    exit_code = 2


class Preempted(SystemExit):
    """The run stopped at an agreed step after a preemption notice; relaunch to resume.

    A ``SystemExit`` so that a user's ``except Exception`` around the loop cannot swallow it:
    the process ends with exit code 75 (``EX_TEMPFAIL``), which schedulers treat as "retry".
    """

    exit_code = 75

    def __init__(self, message: str = "preempted") -> None:
        super().__init__(self.exit_code)
        self.message = message

    def __str__(self) -> str:
        return self.message


EXIT_PREEMPTED = Preempted.exit_code
