"""Ray Train's failure policy, told trainkit's exit codes: which group failures to retry.

Ray's default policy restarts the group up to ``FailureConfig.max_failures``. trainkit
changes three decisions: a config/store error (2) never retries, since retrying a
deterministic error would loop for ever with ``max_failures=-1``; a group that stopped
for a preemption (every worker 75) restarts on Ray's preemption budget, not on
``max_failures``; and the same Python error from the training code ``CRASH_REPEATS``
times in a row is a bug, not bad luck, and ends the job.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from trainkit.errors import EXIT_PREEMPTED
from trainkit.launch.base import EXIT_CONFIG
from trainkit.launch.ray.exits import WorkerExit, worker_exits
from trainkit.launch.worker import PEER_LOST

log = logging.getLogger(__name__)

CRASH_REPEATS = int(os.environ.get("TRAINKIT_RAY_CRASH_REPEATS", 3))


def crash_signature(error: Any) -> tuple[str, ...] | None:
    """What a deterministic crash looks like: the same Python error from the training code.

    None when a worker or node died (a Ray error, not ours), the group was preempted, or
    the ranks only lost their peers: those are what restarts are for.
    """
    failures = getattr(error, "worker_failures", None) or {}
    sig = set()
    for exc in failures.values():
        base = getattr(exc, "_base_exc", None)
        if base is None:
            return None
        if isinstance(base, WorkerExit) and base.exit_code == EXIT_PREEMPTED:
            return None
        text = str(base).strip().splitlines()[0] if str(base).strip() else ""
        if PEER_LOST not in text:
            sig.add(f"{type(base).__name__}: {text[:200]}")
    return tuple(sorted(sig)) or None


def failure_policy(failure_config: Any) -> Any:
    """Ray's ``DefaultFailurePolicy`` with the decisions above; built here so Ray loads lazily."""
    from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

    from trainkit.launch.ray.stop import FLAG_ENV, stop_reason

    class TrainkitFailurePolicy(DefaultFailurePolicy):
        _last_crash: tuple[str, ...] | None = None
        _repeats = 0
        # Built in the driver, run in Ray Train's controller: the driver's stop flag, by name.
        _stop_flag = os.environ.get(FLAG_ENV)

        def make_decision(self, training_failed_error: Any) -> Any:
            exits = worker_exits(training_failed_error)
            if any(e is not None and e.exit_code == EXIT_CONFIG for e in exits.values()):
                return FailureDecision.RAISE
            if stop_reason(self._stop_flag):
                return FailureDecision.RAISE  # the driver was told to stop: exit 75, relaunch resumes
            crash = crash_signature(training_failed_error)
            self._repeats = self._repeats + 1 if crash is not None and crash == self._last_crash else 1
            self._last_crash = crash
            if crash is not None and self._repeats >= CRASH_REPEATS:
                log.error("trainkit: the same error %d times in a row, giving up: %s", self._repeats, "; ".join(crash))
                return FailureDecision.RAISE
            if exits and all(e is not None and e.exit_code == EXIT_PREEMPTED for e in exits.values()):
                self._preemption_failures += 1
                limit = self.failure_config.max_preemption_failures
                if limit != -1 and self._preemption_failures > limit:
                    return FailureDecision.RAISE
                log.info("trainkit: workers preempted (exit 75); restarting the group to resume")
                return FailureDecision.RETRY
            return super().make_decision(training_failed_error)

    return TrainkitFailurePolicy(failure_config)
