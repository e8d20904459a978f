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


def _record_message(message: str) -> None:
    """Leaves the error where the elastic agent collects it, without a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)


@record
def worker_main(cfg_dict: Mapping[str, Any]) -> None:
    """Runs :func:`trainkit.train.train`; expected failures exit with one line, no traceback.

    A rank whose peer died only reports that (the launcher names the rank that failed first),
    so a crash is shown once rather than once per rank.
    """
    from trainkit.train import train

    try:
        train(cfg_dict)
    except Preempted:
        raise
    except TrainkitError as exc:
        _record_message(f"trainkit: {exc}")
        raise SystemExit(exc.exit_code) from None
    except RuntimeError as exc:
        if _is_peer_loss(exc):
            raise SystemExit(1) from None
        raise
