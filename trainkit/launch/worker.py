"""The function each launched worker runs: the training function, with errors made readable."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record

from trainkit.errors import Preempted, TrainkitError


def _is_peer_loss(exc: BaseException) -> bool:
    text = str(exc)
    return any(m in text for m in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _record_message(message: str, exit_code: int) -> None:
    """Leaves the error where the launcher looks for it, without a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            extra = {"timestamp": str(int(time.time())), "exitcode": exit_code}
            json.dump({"message": {"message": message, "extraInfo": extra}}, f)


@record
def worker_main(cfg_dict: Mapping[str, Any]) -> None:
    """Runs :func:`trainkit.train.train`; expected failures exit with one line, no traceback.

    A rank whose peer died only reports that (the launcher names the rank that failed first),
    so a crash is shown once rather than once per rank. The process leaves without
    interpreter finalization (see :func:`trainkit.distributed.exit_guard`).
    """
    from trainkit import distributed
    from trainkit.train import train

    with distributed.exit_guard():
        try:
            train(cfg_dict)
        except Preempted:
            raise
        except TrainkitError as exc:
            _record_message(f"trainkit: {exc}", exc.exit_code)
            raise SystemExit(exc.exit_code) from None
        except RuntimeError as exc:
            if _is_peer_loss(exc):
                raise SystemExit(1) from None
            raise
