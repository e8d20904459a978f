"""``python -m trainkit.launch.tune.trial SPEC.json``: one sweep trial's trainkit run, on the node
Tune placed the trial on.

The spec holds the trial's overrides, recipe directories and ``run_dir``. The run is composed
and validated here, then started with the local launcher (``launcher.workers`` processes on
this node; a one-worker trial runs in this process), with the same training function and
resume semantics as any trainkit run: a relaunched trial continues from its run_dir's
``latest`` checkpoint.

A stop signal (SIGTERM: the scheduler stopped the trial) reaches the run, which agrees on a
step, saves and leaves with 75. When the trial's driver is lost, Ray ends the trial actor and
every process it started (this one and its workers), so no run trains on unwatched; the
resumed trial continues from its last committed checkpoint.
"""

from __future__ import annotations

import json
import sys

from trainkit.errors import EXIT_PREEMPTED, TrainkitError


def run(spec: dict) -> int:
    from trainkit.launch.compose import compose_config
    from trainkit.launch.local import LocalLauncher, LocalOptions
    from trainkit.launch.prepare import prepare

    cfg = compose_config(spec["overrides"], spec["config_dirs"])
    cfg.run_dir = spec["run_dir"]  # set, not overridden: a trial's name holds "=" (lr=0.1)
    # The trial's workers run here, on the resources Tune reserved for it.
    cfg.launcher = LocalOptions(workers=cfg.launcher.world_size)
    prepare(cfg)
    if cfg.launcher.world_size == 1:
        return alone(cfg.to_dict())
    result = LocalLauncher().run(cfg)
    if result.exit_code not in (0, EXIT_PREEMPTED) and result.message:
        print(f"error: {result.message}", file=sys.stderr, flush=True)
    return result.exit_code


def alone(cfg_dict: dict) -> int:
    """A one-worker trial in this process (what a library user's script does): no agent and no
    second interpreter to start, and the stop signal reaches the run's own watcher here."""
    from trainkit.launch.worker import exit_for, run_job

    try:
        run_job(cfg_dict)
    except Exception as exc:  # noqa: BLE001 - mapped to the launcher's exit codes, bugs re-raised
        outcome = exit_for(exc)
        if outcome is None:
            raise
        code, message = outcome
        if code != EXIT_PREEMPTED:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return code
    return 0


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        code = run(spec)
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
