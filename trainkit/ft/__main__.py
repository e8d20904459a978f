"""``python -m trainkit.ft CONFIG_JSON GROUP``: one replica group's process (the supervisor
starts it); expected failures exit with one line and trainkit's exit codes.

The process ends with ``os._exit`` once the loop has closed what it owns (ledger,
checkpointer, Manager): torchft's and gloo's threads otherwise hold up interpreter exit for
many seconds, and a group that lingers delays the job's end.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def main(argv: list[str]) -> int:
    from trainkit.errors import EXIT_PREEMPTED, Preempted
    from trainkit.ft.loop import EXIT_LEFT, LeftQuorum, run_group
    from trainkit.launch.worker import exit_for

    logging.getLogger("torchft").setLevel(logging.ERROR)  # per-step INFO, and a CUDA-only warning
    path, group = argv[0], int(argv[1])
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    try:
        run_group(cfg, group)
    except LeftQuorum as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return EXIT_LEFT
    except Preempted as exc:  # a SystemExit: it would skip the os._exit below
        print(str(exc), file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except Exception as exc:
        outcome = exit_for(exc)
        if outcome is None:
            raise
        code, message = outcome
        print(f"replica group {group}: {message}", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
