"""The function each launched worker runs: the training function, with errors made readable.

:func:`exit_for` is the one mapping from how a worker's training ended to the CLI's exit
codes; the local worker below and the Ray worker (:mod:`trainkit.launch.ray.worker`) both
use it and differ only in how they hand the outcome to their launcher.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record

from trainkit.distributed import is_peer_loss
from trainkit.errors import EXIT_PREEMPTED, Preempted, TrainkitError

PEER_LOST = "lost a peer worker"


def exit_for(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an ending trainkit expects; None for a bug, which keeps its traceback.

    75 preempted (relaunch to resume), 2 config or store, 1 anything else trainkit reported
    or a lost peer.
    """
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED, str(exc)
    if isinstance(exc, TrainkitError):
        return exc.exit_code, f"trainkit: {exc}"
    if is_peer_loss(exc):
        return 1, f"{PEER_LOST} ({str(exc).splitlines()[0]})"
    return None


def _record_message(message: str, exit_code: int) -> None:
    """Leaves the error where the launcher looks for it, without a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            extra = {"timestamp": str(int(time.time())), "exitcode": exit_code}
            json.dump({"message": {"message": message, "extraInfo": extra}}, f)


def run_job(cfg_dict: Mapping[str, Any]) -> Any:
    """What a worker runs: the user's script when the launcher was given ``script=``
    (:mod:`trainkit.launch.script`), else the recipe's :func:`trainkit.train.train`."""
    from trainkit.launch.script import launched_script, run_script

    spec = launched_script()
    if spec is not None:
        return run_script(spec)
    from trainkit.train import train

    return train(cfg_dict)


@record
def worker_main(cfg_dict: Mapping[str, Any]) -> None:
    """Runs the job (:func:`run_job`); expected failures exit with one line, no traceback.

    A rank whose peer died only reports that (the launcher names the rank that failed first),
    so a crash is shown once rather than once per rank. The process leaves without
    interpreter finalization (see :func:`trainkit.distributed.exit_guard`).
    """
    from trainkit import distributed

    with distributed.exit_guard():
        try:
            run_job(cfg_dict)
        except BaseException as exc:
            outcome = exit_for(exc)
            if outcome is None or isinstance(exc, Preempted):
                raise
            code, message = outcome
            if not is_peer_loss(exc):
                _record_message(message, code)
            raise SystemExit(code) from None
