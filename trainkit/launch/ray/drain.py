"""A stop asked of the Ray driver, seen from a training worker, handed to trainkit's preemption path.

Two notices reach a Ray worker that no signal brings:

* a node drain (spot reclaim seen by the autoscaler, ``ray drain-node``, KubeRay scale
  down): Ray Train's own watcher records it in each worker, and
  :class:`~trainkit.launch.ray.report.PreemptionProbe` asks for it with
  ``ray.train.get_preemption_info()``, a barrier, so at agreed step boundaries;
* a stop asked of the driver (:mod:`.stop`): :class:`DrainWatch` reads the driver's flag
  actor from a thread (an ordinary actor call, no barrier).

Either way trainkit's PreemptionWatcher is asked to stop (:func:`request_stop`); the ranks
agree on a step, save and leave with exit 75.
"""

from __future__ import annotations

import os
import threading

from trainkit.launch.ray.stop import FLAG_ENV, stop_reason


class DrainWatch:
    """Polls the driver's stop flag every ``poll_seconds`` (nothing to do outside a Ray worker)."""

    def __init__(self, poll_seconds: float = 5.0) -> None:
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trainkit-ray-stop", daemon=True)
        self.reason: str | None = None
        self._flag: str | None = None

    def start(self) -> None:
        self._flag = os.environ.get(FLAG_ENV)
        try:
            import ray

            if not self._flag or not ray.is_initialized():  # not in a Ray worker (and no ray.init)
                return
        except ImportError:
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> str | None:
        """The driver's stop reason, or None; one poll."""
        return stop_reason(self._flag)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            reason = self.check()
            if reason:
                self.reason = reason
                request_stop(reason)
                return


def request_stop(reason: str) -> int:
    """Hands a stop request to every running PreemptionWatcher in this worker process."""
    from trainkit.preemption import request

    return request(reason)
