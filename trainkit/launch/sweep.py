"""``python -m trainkit.launch -m key=a,b other=x,y``: a grid of trials, each its own run.

The overrides are expanded by Hydra's own parser and BasicSweeper (choice sweeps
``a,b``, ``choice(a,b)``, ``range(1,4)``, globs of config groups...), so what a Hydra user
types means the same here. Every trial is composed and validated before any starts (one
bad value: exit 2, nothing launched). Each trial gets ``<base>/trial-<i>-<params>`` as its
``run_dir``, where ``<base>`` is the ``run_dir`` given on the command line or
``runs/<recipe>-sweep``; relaunching the same sweep resumes every unfinished trial.

The trials go to the launcher's :meth:`~trainkit.launch.base.Launcher.run_many`: with
``launcher=ray`` they run concurrently on the cluster, as many at once as its CPUs (GPUs)
hold; with ``launcher=local`` one after the other. A results table follows.
"""

from __future__ import annotations

import re
import sys
import threading

from trainkit import rundir, storage
from trainkit.config import Config, run_dir_default
from trainkit.errors import EXIT_PREEMPTED, ConfigError, TrainkitError
from trainkit.launch.base import EXIT_CONFIG, EXIT_FAILED, STATUS, JobResult

MAX_NAME = 60


def expand(overrides: list[str]) -> list[list[str]]:
    """The trials' override lists, in Hydra's order (the last swept key varies fastest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from trainkit._compat import hydra_sweep_grid

    try:
        return hydra_sweep_grid(OverridesParser.create().parse_overrides(overrides=list(overrides)))
    except HydraException as exc:
        raise ConfigError(f"sweep: {str(exc).strip().splitlines()[0]}") from exc


def swept_keys(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def trial_name(index: int, trial: list[str], keys: list[str]) -> str:
    """``trial-<i>-<short params>``: the swept keys' last part and value, path-safe."""
    parts = []
    for item in trial:
        key, _, value = item.partition("=")
        if key in keys:
            parts.append(f"{key.lstrip('+~').rsplit('.', 1)[-1]}={value}")
    short = re.sub(r"[^A-Za-z0-9._=+-]+", "_", ",".join(parts))[:MAX_NAME].strip("_")
    return f"trial-{index}-{short}" if short else f"trial-{index}"


def plan(overrides: list[str], config_dirs: list[str] = ()) -> list[tuple[list[str], Config]]:
    """Every trial's overrides and validated Config (with its own run_dir); raises ConfigError."""
    from trainkit.launch.compose import compose_config

    trials = expand(overrides)
    keys = swept_keys(overrides)
    if "run_dir" in keys:
        raise ConfigError("run_dir cannot be swept: each trial gets <run_dir>/trial-<i>-<params>")
    base_given = any(o.partition("=")[0].lstrip("+~") == "run_dir" for o in overrides)
    planned = []
    for i, trial in enumerate(trials):
        try:
            cfg = compose_config(trial, config_dirs)
        except ConfigError as exc:
            params = " ".join(t for t in trial if t.partition("=")[0] in keys)
            raise ConfigError(f"sweep trial {i} ({params}): {exc}") from exc
        base = cfg.run_dir if base_given else run_dir_default(cfg.recipe) + "-sweep"
        cfg.run_dir = storage.join(base, trial_name(i, trial, keys))
        planned.append(([t for t in trial if t.partition("=")[0] in keys], cfg))
    names = {c.launcher.name for _, c in planned}
    if len(names) > 1:
        raise ConfigError(f"sweep: all trials must use one launcher, got {', '.join(sorted(names))}")
    return planned


def sweep(overrides: list[str], config_dirs: list[str] = ()) -> int:
    """Validates every trial, runs them, prints the table; 0 when all finished."""
    from trainkit.components import LAUNCHERS
    from trainkit.launch.prepare import prepare

    planned = plan(overrides, config_dirs)
    for _, cfg in planned:
        prepare(cfg)  # stores reachable, embedded data written once: before any trial starts
    print(f"sweep: {len(planned)} trials", flush=True)
    for (params, cfg) in planned:
        print(f"  {' '.join(params) or '(no swept keys)'} -> {cfg.run_dir}", flush=True)
    lock = threading.Lock()  # a launcher may run trials concurrently

    def started(i: int) -> None:
        with lock:
            print(f"sweep: trial {i} ({' '.join(planned[i][0])}) starting", flush=True)

    def ended(i: int, result: JobResult) -> None:
        status = result.status if not result.exit_code else f"exit {result.exit_code}: {result.message}"
        with lock:
            print(f"sweep: trial {i} ({' '.join(planned[i][0])}) {status}", flush=True)

    launcher = LAUNCHERS.get(planned[0][1].launcher.name, "launcher")()
    results = launcher.run_many([cfg for _, cfg in planned], started=started, ended=ended)
    print(table(planned, results), flush=True)
    codes = [r.exit_code for r in results]
    if all(c == 0 for c in codes):
        return 0
    if any(c == EXIT_CONFIG for c in codes):
        return EXIT_CONFIG
    if all(c in (0, EXIT_PREEMPTED) for c in codes):
        return EXIT_PREEMPTED
    return EXIT_FAILED


COLUMNS = ("loss", "eval_loss", "eval_accuracy", "steps")


def table(planned: list[tuple[list[str], Config]], results: list[JobResult]) -> str:
    """Params, final metrics from each trial's summary, status; plain text columns."""
    header = ["trial", "params", *COLUMNS, "status", "run_dir"]
    rows = [header]
    for i, ((params, cfg), res) in enumerate(zip(planned, results)):
        summary = rundir.read_summary(cfg.run_dir) or {}
        cells = [str(i), " ".join(params) or "-"]
        for col in COLUMNS:
            v = summary.get(col)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        status = res.status if res.exit_code in STATUS else f"{res.status} ({res.exit_code})"
        cells += [status, cfg.run_dir]
        rows.append(cells)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    errors = [f"trial {i}: {r.message}" for i, r in enumerate(results) if r.exit_code and r.message]
    return "\n".join(["", "sweep results:", *lines, *errors])


def main() -> None:  # pragma: no cover - convenience for `python -m trainkit.launch.sweep`
    try:
        code = sweep(sys.argv[1:])
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
