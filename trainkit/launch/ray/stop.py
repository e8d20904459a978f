"""A stop asked of the Ray driver (SIGTERM to ``python -m trainkit.launch launcher=ray``), for the workers.

On a VM or under Slurm the notice reaches the command; on Ray the workers are elsewhere and
run in threads without signal handlers. The driver keeps the request in a small named actor
(:func:`driver_stop`); each worker's :class:`~trainkit.launch.ray.drain.DrainWatch` polls it
like a node drain, so the ranks agree on a step, save and leave with 75, and the failure
policy ends the job instead of restarting the group: the command exits 75 and relaunching
it resumes, as with the local launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

# The flag actor's name, for the workers and the failure policy (propagated as TRAINKIT_*).
FLAG_ENV = "TRAINKIT_RAY_STOP_FLAG"
NAMESPACE = "trainkit"


def _flag_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self) -> None:
            self.reason: str | None = None

        def set(self, reason: str) -> None:
            self.reason = self.reason or reason

        def get(self) -> str | None:
            return self.reason

    return StopFlag


@contextlib.contextmanager
def driver_stop(signals: list[str]) -> Iterator[None]:
    """While the job runs, ``signals`` to this (driver) process ask the workers to stop."""
    if threading.current_thread() is not threading.main_thread() or not signals:
        yield
        return
    import ray

    name = f"trainkit-stop-{uuid.uuid4().hex[:12]}"
    flag = _flag_class().options(name=name, namespace=NAMESPACE).remote()

    def handle(signum: int, frame: Any) -> None:
        reason = f"signal {signal.Signals(signum).name} to the driver"
        flag.set.remote(reason)
        print(f"trainkit: {reason}: the workers stop at an agreed step (checkpoint, exit 75)", flush=True)

    previous = {s: signal.signal(getattr(signal, s), handle) for s in signals}
    os.environ[FLAG_ENV] = name
    try:
        yield
    finally:
        os.environ.pop(FLAG_ENV, None)
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
