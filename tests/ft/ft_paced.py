"""The resnet task with a pace, for the replica-group tests (``task=ft_paced:TASK``).

A survivor trains tiny steps in milliseconds, a replacement takes seconds to start (tens on a
loaded machine): left alone, the survivors would finish before their peer rejoins. So while
group 1's replacement is not yet healed, every chunk waits ``PACE_S``, and after
``MIN_ALONE`` steps without group 1 the survivors wait for the replacement's process to start (it
must keep stepping after that, since the replacement heals at the survivor's next quorum).
``CHUNK_S_ENV`` instead gives every chunk a floor, so a heartbeat timeout spans at most a known
number of steps whatever the machine's speed. Nothing here changes what is
computed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from trainkit.tasks.resnet import TASK as RESNET

LEDGERS_ENV = "FT_TEST_LEDGERS"
CHUNK_S_ENV = "FT_TEST_CHUNK_S"
GROUPS_ENV = "FT_TEST_GROUPS"  # ft.groups of the run: a step "alone" has one group fewer
PACE_S = 0.15
MIN_ALONE = 5
START_WAIT_S = 300


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _pace() -> None:
    ledgers = os.environ.get(LEDGERS_ENV)
    if not ledgers:
        return
    deadline = time.monotonic() + START_WAIT_S
    while True:
        replacement = _read(Path(ledgers, "group-1.jsonl"))
        short = int(os.environ.get(GROUPS_ENV, "2")) - 1
        alone = _read(Path(ledgers, "group-0.jsonl")).count(f'"participants": {short},')
        if not alone or '"event": "healed"' in replacement:
            return
        if alone < MIN_ALONE or '"incarnation": 1' in replacement or time.monotonic() > deadline:
            time.sleep(PACE_S)
            return
        time.sleep(0.05)


def _loss(model, batch):
    _pace()
    time.sleep(float(os.environ.get(CHUNK_S_ENV, "0")))
    return RESNET.loss(model, batch)


TASK = dataclasses.replace(RESNET, loss=_loss)
