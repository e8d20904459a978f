"""Ray Train's per-worker function: the job (a recipe's training function or a script), as the local workers run it.

The outcome is mapped to an exit code by :func:`trainkit.launch.worker.exit_for`, the same
mapping the local worker uses, and raised as a :class:`WorkerExit` for Ray to carry.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from trainkit.launch.ray.drain import DrainWatch
from trainkit.launch.ray.exits import WorkerExit
from trainkit.launch.worker import exit_for


def ray_worker_main(cfg_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """Trains with a drain watch; returns the summary, raises WorkerExit for what trainkit expects."""
    from trainkit.launch.ray.warm_pool import publish_runtime_env
    from trainkit.launch.script import add_settings
    from trainkit.launch.worker import run_job

    cfg_dict = dict(cfg_dict)
    if threading.current_thread() is not threading.main_thread():
        # Ray Train runs us in a thread, where Python cannot install signal handlers; a
        # Ray worker learns of a drain from the GCS instead (DrainWatch).
        cfg_dict["preemption"] = {**cfg_dict.get("preemption", {}), "signals": []}
        add_settings({"preemption": {"signals": []}})
    poll = float(cfg_dict.get("preemption", {}).get("poll_seconds", 5.0) or 5.0)
    watch = DrainWatch(gcs_poll_seconds=poll)
    watch.start()
    publish_runtime_env()
    if os.environ.get("RANK", "0") != "0":
        # Ray shows every worker's INFO records; one rank's checkpoint lines are enough.
        logging.getLogger("trainkit").setLevel(logging.WARNING)
    try:
        summary = run_job(cfg_dict)
    except BaseException as exc:
        outcome = exit_for(exc)
        if outcome is None:
            raise
        raise WorkerExit(*outcome) from None
    finally:
        watch.stop()
    return json.loads(json.dumps(summary, default=str)) if isinstance(summary, dict) else None
