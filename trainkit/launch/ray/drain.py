"""A Ray node drain, seen from a training worker, handed to trainkit's preemption path.

A drain (spot reclaim seen by the autoscaler, ``ray drain-node``, KubeRay scale down)
reaches the same stop as a SIGTERM on a VM: :class:`DrainWatch` polls for it in each
worker and asks trainkit's PreemptionWatcher to stop; the ranks agree on a step, save and
leave with exit 75.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from trainkit.launch.ray.stop import FLAG_ENV, stop_reason


class DrainWatch:
    """Polls whether this worker's Ray node (or any node of its group) is being drained.

    Three sources, all reachable from a worker in Ray 2.60:

    1. Ray Train v2's PreemptionWatcher actor polls the GCS drain table for the group's
       nodes and calls ``mark_preempt`` on every worker, which stores a ``PreemptionInfo``
       in the worker's train context; we read that attribute (no collective, unlike
       ``ray.train.get_preemption_info()``, which is a barrier and cannot run in a thread).
    2. ``ray._private.state.state.get_draining_nodes()`` (``{node_id_hex: deadline_ms}``),
       the same table, read directly for this worker's node: covers Ray versions or
       settings without the watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``).

    3. A stop asked of the driver (:mod:`.stop`), read with the GCS.

    On a drain or a stop it asks trainkit's PreemptionWatcher to stop (:func:`request_stop`).
    """

    def __init__(self, poll_seconds: float = 0.5, gcs_poll_seconds: float = 5.0) -> None:
        # Reading the train context is an attribute lookup; the GCS is asked less often.
        self.poll_seconds = poll_seconds
        self.gcs_poll_seconds = gcs_poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trainkit-ray-drain", daemon=True)
        self.reason: str | None = None
        self._context: Any = None
        self._node_id: str | None = None
        self._last_gcs = 0.0

    def start(self) -> None:
        try:
            import ray

            if not ray.is_initialized():  # not in a Ray worker: nothing to watch (and no ray.init)
                return
            self._node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - not in a Ray worker: nothing to watch
            return
        with contextlib.suppress(Exception):
            from ray.train.v2._internal.execution.context import get_train_context

            self._context = get_train_context()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> str | None:
        """The drain reason, or None; one poll."""
        info = getattr(getattr(self._context, "preemption_context", None), "preemption_info", None)
        if info is not None:
            return _drain_reason(getattr(info, "preempted_node_ids", []), getattr(info, "deadline_ms", None))
        now = time.monotonic()
        if self._node_id and now - self._last_gcs >= self.gcs_poll_seconds:
            self._last_gcs = now
            asked = stop_reason(os.environ.get(FLAG_ENV))
            if asked:
                return asked
            try:
                import ray._private.state

                drained = ray._private.state.state.get_draining_nodes() or {}
            except Exception:  # noqa: BLE001 - a GCS hiccup: try again next poll
                return None
            if self._node_id in drained:
                return _drain_reason([self._node_id], drained[self._node_id] or None)
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            reason = self.check()
            if reason:
                self.reason = reason
                request_stop(reason)
                return


def _drain_reason(nodes: list[str], deadline_ms: int | None) -> str:
    left = f", {max(0.0, deadline_ms / 1000 - time.time()):.0f}s before the deadline" if deadline_ms else ""
    names = ", ".join(n[:8] for n in nodes) or "?"
    return f"ray node drain ({names}{left})"


def request_stop(reason: str) -> int:
    """Hands a stop request to every running PreemptionWatcher in this worker process."""
    from trainkit.preemption import request

    return request(reason)
