"""``python -m trainkit.launch -m key=a,b other=x,y``: a sweep, each trial its own run.

With ``launcher=ray`` a sweep is a Ray Tune experiment (:mod:`trainkit.launch.tune`): search
spaces from a sweep file (``sweep=<name>``) or Hydra's sweep grammar, random, grid or Optuna
search, ASHA early stopping, and a sweep that resumes after its driver is lost.

With any other launcher it is a grid, run in turn (:meth:`~trainkit.launch.base.Launcher.run_many`):
the overrides are expanded the way Hydra's basic sweeper expands them (choice sweeps ``a,b``,
``choice(a,b)``, ``range(1,4)``), through Hydra's public override parser, so what a Hydra user
types means the same here. Every trial is composed and validated before any starts (one bad
value: exit 2, nothing launched). Each trial gets ``<base>/trial-<i>-<params>`` as its
``run_dir``, where ``<base>`` is the ``run_dir`` given on the command line or
``runs/<recipe>-sweep``; relaunching the same sweep resumes every unfinished trial. A results
table follows.
"""

from __future__ import annotations

import itertools
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

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(f"sweep: {str(exc).strip().splitlines()[0]}") from exc
    # One list of "key=value" per key, a later override of a key replacing an earlier one.
    axes: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP":
            raise ConfigError(f"sweep: {o.input_line}: glob() is not supported; list the choices (a,b)")
        elif not o.is_discrete_sweep():
            raise ConfigError(f"sweep: {o.input_line}: {o.value_type.name} sweeps are sampled, which needs "
                              "launcher=ray (Ray Tune); a grid takes lists (a,b), choice() or range()")
        else:
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
    return [list(trial) for trial in itertools.product(*axes.values())]


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
    """Runs the sweep on Ray Tune (``launcher=ray``) or as a grid in turn; 0 when all finished."""
    from trainkit.launch.compose import compose_config
    from trainkit.launch.tune import options, space

    name, keys, rest = options.split(overrides)
    data = options.load(name, keys, config_dirs) if name is not None or keys else {}
    fixed, _ = space.from_overrides(rest)
    if compose_config([*data.get("overrides", []), *fixed], config_dirs).launcher.name == "ray":
        from trainkit.launch.ray.session import ray_env

        ray_env()  # Ray reads these settings when it is imported, which the driver module does
        from trainkit.launch.tune.driver import tune_sweep

        return tune_sweep(data, rest, config_dirs)
    if name is not None or keys:
        given = f"sweep={name}" if name is not None else keys[0]
        raise ConfigError(f"{given}: search spaces and schedulers run on Ray Tune: add launcher=ray "
                          "(launcher.address='' starts a private Ray on this machine)")
    return grid_sweep(rest, config_dirs)


def grid_sweep(overrides: list[str], config_dirs: list[str] = ()) -> int:
    """Validates every trial, runs them with the launcher's ``run_many``, prints the table."""
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


def cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))


def cost_cell(summary: dict) -> str:
    """``cost_usd`` from a trial's summary.json (written when a price is known), else "-"."""
    usd = summary.get("cost_usd")
    return f"${usd:.4f}" if isinstance(usd, (int, float)) else "-"


def columns(rows: list[list[str]]) -> list[str]:
    """Left-aligned text columns, a rule under the header row."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(planned: list[tuple[list[str], Config]], results: list[JobResult]) -> str:
    """Params, final metrics and cost from each trial's summary, status; plain text columns."""
    rows = [["trial", "params", *COLUMNS, "cost", "status", "run_dir"]]
    for i, ((params, cfg), res) in enumerate(zip(planned, results)):
        summary = rundir.read_summary(cfg.run_dir) or {}
        status = res.status if res.exit_code in STATUS else f"{res.status} ({res.exit_code})"
        rows.append([str(i), " ".join(params) or "-", *(cell(summary.get(c)) for c in COLUMNS),
                     cost_cell(summary), status, cfg.run_dir])
    errors = [f"trial {i}: {r.message}" for i, r in enumerate(results) if r.exit_code and r.message]
    return "\n".join(["", "sweep results:", *columns(rows), *errors])


def main() -> None:  # pragma: no cover - convenience for `python -m trainkit.launch.sweep`
    try:
        code = sweep(sys.argv[1:])
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
