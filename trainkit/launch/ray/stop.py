"""A stop asked of the Ray driver (SIGTERM to ``python -m trainkit.launch launcher=ray``), for the workers.

On a VM or under Slurm the notice reaches the command; on Ray the workers are elsewhere and
run in threads without signal handlers. The driver keeps the request in a small named actor
(:func:`driver_stop`); each worker's :class:`~trainkit.launch.ray.drain.DrainWatch` polls it
like a node drain, so the ranks agree on a step, save and return "75" as their value (not
an error), so Ray ends the run instead of restarting the group: the command exits 75 and
relaunching it resumes, as with the local launcher.

The same actor carries what one attempt decides for the attempts after it, which Ray's
public API has no place for: a config error (2) seen by some ranks only, or the same crash
``CRASH_REPEATS`` times in a row on one rank, ends the job; the next attempt's workers
return it as their value at once (:func:`job_outcome`), and the driver reads it from here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

# The flag actor's name, for the workers (propagated as TRAINKIT_*).
FLAG_ENV = "TRAINKIT_RAY_STOP_FLAG"
NAMESPACE = "trainkit"
CRASH_REPEATS = int(os.environ.get("TRAINKIT_RAY_CRASH_REPEATS", 3))


def _flag_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self) -> None:
            self.reason: str | None = None
            self.outcome: tuple[int, str] | None = None
            self.failures: dict[int, list[str | None]] = {}

        def set(self, reason: str) -> None:
            self.reason = self.reason or reason

        def get(self) -> str | None:
            return self.reason

        def end(self, code: int, message: str) -> None:
            self.outcome = self.outcome or (code, message)

        def ended(self) -> tuple[int, str] | None:
            return self.outcome

        def failed(self, rank: int, signature: str | None) -> None:
            message = repeated_crash(self.failures.setdefault(rank, []), signature)
            if message:
                self.end(1, f"worker rank {rank}: {message}")

    return StopFlag


def repeated_crash(history: list[str | None], signature: str | None) -> str | None:
    """Adds one failed attempt to a rank's ``history``; why to give up, when the last
    ``CRASH_REPEATS`` were the same crash (a bug, not bad luck), else None."""
    history.append(signature)
    del history[:-CRASH_REPEATS]
    if signature is not None and len(history) == CRASH_REPEATS and len(set(history)) == 1:
        return f"the same error {CRASH_REPEATS} times in a row, giving up: {signature}"
    return None


@contextlib.contextmanager
def driver_stop(signals: list[str]) -> Iterator[str]:
    """One job's flag actor; yields its name, for the job's workers (``FLAG_ENV``).

    In the main thread, ``signals`` to this (driver) process set it: the workers stop."""
    import ray

    name = f"trainkit-stop-{uuid.uuid4().hex[:12]}"
    flag = _flag_class().options(name=name, namespace=NAMESPACE).remote()

    def handle(signum: int, frame: Any) -> None:
        reason = f"signal {signal.Signals(signum).name} to the driver"
        flag.set.remote(reason)
        print(f"trainkit: {reason}: the workers stop at an agreed step (checkpoint, exit 75)", flush=True)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(getattr(signal, s), handle) for s in signals} if main else {}
    try:
        yield name
    finally:
        for s, handler in previous.items():
            signal.signal(getattr(signal, s), handler)
        with contextlib.suppress(Exception):
            ray.kill(flag)


def stop_reason(name: str | None) -> str | None:
    """Why the driver asked to stop, or None (also when there is no flag or it cannot be read)."""
    if not name:
        return None
    try:
        import ray

        return ray.get(ray.get_actor(name, namespace=NAMESPACE).get.remote(), timeout=5)
    except Exception:  # noqa: BLE001 - no flag (the driver is gone) or a GCS hiccup: no request seen
        return None


def _flag(name: str | None) -> Any:
    import ray

    return ray.get_actor(name, namespace=NAMESPACE)


def job_outcome(name: str | None) -> tuple[int, str] | None:
    """The (exit code, message) an earlier attempt ended the job with, or None."""
    if not name:
        return None
    try:
        import ray

        found = ray.get(_flag(name).ended.remote(), timeout=5)
    except Exception:  # noqa: BLE001 - no flag: no decision
        return None
    return (int(found[0]), str(found[1])) if found else None


def set_outcome(name: str | None, code: int, message: str) -> None:
    """Ends the job with ``code`` for every later attempt (first decision wins)."""
    if name:
        with contextlib.suppress(Exception):
            import ray

            ray.get(_flag(name).end.remote(code, message), timeout=5)


def note_failure(name: str | None, rank: int, signature: str | None) -> None:
    """Counts a failed attempt of ``rank`` (None: a failure restarts are for, which resets)."""
    if name:
        with contextlib.suppress(Exception):
            import ray

            ray.get(_flag(name).failed.remote(rank, signature), timeout=5)
