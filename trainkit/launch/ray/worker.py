"""Ray Train's per-worker function: the job (a recipe's training function or a script), as the local workers run it.

:func:`ray_worker_main` is also the public entry point for anyone who runs trainkit with
their own ``TorchTrainer`` (see docs/clusters.md): give it a config from
:func:`trainkit.launch.ray.worker_cfg` as ``train_loop_config``.

How a run ends decides what Ray sees, with Ray's public API only:

* done, or stopped because the driver was told to stop: every rank makes one last
  ``ray.train.report`` and returns ``{"exit_code", "message", "summary"}``; Ray finishes the
  run and ``Result.return_value`` is rank 0's value (the driver's exit code comes from it);
* a config or store error (exit 2): returned as such a value, never raised, so Ray does not
  retry a deterministic error; the driver's stop flag keeps the next attempt from training
  when only some ranks saw it (:mod:`.stop`);
* preempted (a drain, any other notice): a :class:`WorkerExit` with 75 is raised after the
  emergency checkpoint, and Ray restarts the group, which resumes from trainkit's ``latest``;
* anything else raises: Ray restarts the group (``FailureConfig.max_failures``), and the same
  error from the training code ``CRASH_REPEATS`` times in a row on a rank ends the job (.stop).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from trainkit.errors import EXIT_PREEMPTED
from trainkit.launch.base import EXIT_CONFIG
from trainkit.launch.ray.drain import DrainWatch
from trainkit.launch.ray.exits import WorkerExit
from trainkit.launch.ray.stop import FLAG_ENV, job_outcome, note_failure, set_outcome, stop_reason
from trainkit.launch.worker import PEER_LOST, exit_for


def outcome(exit_code: int, message: str = "", summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The value a worker returns (``Result.return_value`` for rank 0)."""
    return {"exit_code": exit_code, "message": message, "summary": summary}


def crash_signature(exc: BaseException) -> str | None:
    """What a deterministic crash looks like: a Python error from the training code. None for
    what restarts are for: a preemption, a lost peer."""
    if isinstance(exc, WorkerExit) and (exc.exit_code == EXIT_PREEMPTED or PEER_LOST in exc.message):
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if PEER_LOST in text:
        return None
    return f"{type(exc).__name__}: {text[:200]}"


def ray_worker_main(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Trains in a Ray Train worker (or in a thread, outside Ray); see the module docstring."""
    from trainkit.launch.ray.report import LOGGER, RayBridge, in_train_worker
    from trainkit.launch.ray.warm_pool import publish_runtime_env
    from trainkit.launch.script import add_settings
    from trainkit.launch.worker import run_job

    flag = os.environ.get(FLAG_ENV)
    earlier = job_outcome(flag)
    if earlier is not None:  # an earlier attempt ended the job (a config error, a repeating crash)
        return outcome(*earlier)
    asked = stop_reason(flag)
    if asked:  # the driver was told to stop before this attempt started: nothing to train
        return outcome(EXIT_PREEMPTED, f"stopped before starting ({asked}); relaunch to resume")
    cfg_dict = dict(cfg_dict)
    settings: dict[str, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        # Ray Train runs us in a thread, where Python cannot install signal handlers; a
        # Ray worker learns of a drain from Ray Train instead (report.PreemptionProbe).
        cfg_dict["preemption"] = {**cfg_dict.get("preemption", {}), "signals": []}
        settings["preemption"] = {"signals": []}
    poll = float(cfg_dict.get("preemption", {}).get("poll_seconds", 5.0) or 5.0)
    bridge = None
    if in_train_worker():
        trainer = dict(cfg_dict.get("trainer", {}))
        trainer["loggers"] = [*trainer.get("loggers", []), LOGGER]
        cfg_dict["trainer"] = trainer
        settings["trainer"] = {"loggers": [*_script_loggers(), LOGGER]}
        bridge = RayBridge(str(cfg_dict.get("run_dir", "")), poll).start()
    if settings:
        add_settings(settings)
    watch = DrainWatch(poll_seconds=poll)
    watch.start()
    publish_runtime_env()
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        # Ray shows every worker's INFO records; one rank's checkpoint lines are enough.
        logging.getLogger("trainkit").setLevel(logging.WARNING)
    try:
        try:
            summary = run_job(cfg_dict)
        except BaseException as exc:
            ended = exit_for(exc)
            if ended is None:
                note_failure(flag, rank, crash_signature(exc))
                raise
            code, message = ended
            if code == EXIT_CONFIG:
                set_outcome(flag, code, message)
                return outcome(code, message)
            if code == EXIT_PREEMPTED:
                if bridge is not None:
                    bridge.reporter.final(None)  # the emergency checkpoint, at the agreed stop
                if stop_reason(flag):
                    return outcome(code, message)  # the driver's stop ends the job: relaunch resumes
            note_failure(flag, rank, None if code == EXIT_PREEMPTED else crash_signature(WorkerExit(code, message)))
            raise WorkerExit(code, message) from None
        summary = json.loads(json.dumps(summary, default=str)) if isinstance(summary, dict) else None
        if bridge is not None:
            bridge.reporter.final(summary)
        return outcome(0, "", summary)
    finally:
        watch.stop()
        if bridge is not None:
            bridge.stop()


def _script_loggers() -> list[str]:
    """The loggers a ``script=`` job's settings name already (the Ray logger comes on top)."""
    from trainkit.launch.script import LAUNCH_SETTINGS_ENV

    raw = os.environ.get(LAUNCH_SETTINGS_ENV)
    if not raw:
        return []
    return [n for n in json.loads(raw).get("trainer", {}).get("loggers", []) if n != "trainkit.launch.ray.report:RayReportLogger"]
