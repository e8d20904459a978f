"""The driver of a Ray Tune sweep: validates it, runs (or resumes) the experiment, prints the table.

The experiment lives in ``<base>/tune`` (``<base>``: the command's ``run_dir``, or
``runs/<recipe>-sweep``), each trial's trainkit run in ``<base>/trial-<i>-<params>``. Running
the same command again after the driver was lost resumes the experiment with
``Tuner.restore``: finished trials keep their results, numbering continues, and unfinished
trials start again on their own run_dir, which resumes from its last committed checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from ray.tune import Callback

from trainkit import rundir, storage
from trainkit.config import Config, run_dir_default
from trainkit.errors import ConfigError
from trainkit.launch.base import EXIT_CONFIG, EXIT_FAILED
from trainkit.launch.tune import options as sweep_opts
from trainkit.launch.tune.space import Param, from_overrides, from_yaml, short

EXPERIMENT = "tune"
# What the experiment directory remembers of the command, so another command is not resumed into it.
COMMAND_FILE = "trainkit-sweep.json"
# How long a stopped trial's run gets to save and leave before it is killed.
STOP_GRACE_S = 120.0
# Tune saves its experiment state at most this often (its default: every 10 s or more), so a
# lost driver loses little of what it knew.
STATE_EVERY_S = "2"


@dataclasses.dataclass
class Plan:
    """A validated sweep: what every trial starts from, what varies, how it is searched."""

    fixed: list[str]
    params: list[Param]
    options: sweep_opts.SweepOptions
    cfg: Config  # the fixed overrides' config (launcher, max_steps, base run_dir)
    base: str
    config_dirs: list[str]
    trials: int  # how many the experiment has in all


def plan_sweep(data: dict[str, Any], overrides: list[str], config_dirs: list[str]) -> Plan:
    """Composes and validates the sweep before Ray starts; raises ConfigError (exit 2)."""
    from trainkit.launch.compose import compose_config

    data = dict(data)
    cli_fixed, cli_params = from_overrides(overrides)
    file_params = from_yaml(data.get("space") or {})
    params = list({p.key: p for p in [*file_params, *cli_params]}.values())  # the command line wins
    if not params:
        raise ConfigError("sweep: nothing to sweep: give key=a,b (or interval(...)) or a sweep file's space:")
    # A sweep of lists only, with no algorithm named, means what it means to Hydra: every
    # combination once.
    data.setdefault("search", "grid" if all(p.finite for p in params) else "random")
    search = data["search"] if isinstance(data["search"], str) else dict(data["search"]).get("name")
    if search == "grid":
        data.setdefault("num_samples", 1)
    opts = sweep_opts.sweep_options(data)
    fixed = [*opts.overrides, *cli_fixed]
    cfg = compose_config(fixed, config_dirs)
    opts.check(cfg)
    opts.search.check_space(params)
    for p in params:
        bare = p.key.lstrip("+~")
        if bare == "run_dir":
            raise ConfigError("run_dir cannot be swept: each trial gets <run_dir>/trial-<i>-<params>")
        if bare == "launcher" or bare.startswith("launcher."):
            raise ConfigError(f"{p.key} cannot be swept: the trials share one Ray cluster")
    if opts.search.name == "grid":
        for i, trial in enumerate(_grid_trials(params)):  # a grid is small: every trial, as the local sweep does
            _probe(fixed, trial, config_dirs, f"sweep trial {i} ({' '.join(trial)})")
    else:
        for p in params:
            for value in p.probes():
                _probe(fixed, [f"{p.key}={value}"], config_dirs, f"sweep {p.key}={value}")
    axes = [p for p in params if p.kind == "grid" or (opts.search.name == "grid" and p.finite)]
    trials = opts.num_samples * math.prod(len(p.values) for p in axes)
    given = any(o.partition("=")[0].lstrip("+~") == "run_dir" for o in fixed)
    base = cfg.run_dir if given else run_dir_default(cfg.recipe) + "-sweep"
    if storage.is_local(base):
        base = os.path.abspath(storage.local_path(base))
    return Plan(fixed, params, opts, cfg, base, [os.path.abspath(d) for d in config_dirs], trials)


def _grid_trials(params: list[Param]) -> list[list[str]]:
    """A grid's trials in Tune's order (its keys sorted, the first varying fastest), each as
    overrides in the sweep's key order: trial ``i`` here is the trial Tune numbers ``i``."""
    import itertools

    by_name = sorted(params, key=lambda p: p.key, reverse=True)
    combos = itertools.product(*([(p.key, v) for v in p.values] for p in by_name))
    order = [p.key for p in params]
    return [[f"{k}={v}" for k, v in sorted(combo, key=lambda kv: order.index(kv[0]))] for combo in combos]


def _probe(fixed: list[str], trial: list[str], config_dirs: list[str], what: str) -> None:
    from trainkit.launch.compose import compose_config

    try:
        compose_config([*fixed, *trial], config_dirs)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from exc


class TrialDirname:
    """Tune's ``trial_dirname_creator``: ``trial-<i>-<params>``, ``i`` from Tune's own trial counter
    (restored with the experiment, so numbering continues after a lost driver)."""

    def __init__(self, first_index: int, keys: list[str]) -> None:
        self.first_index = first_index
        self.keys = keys

    def __call__(self, trial: Any) -> str:
        from trainkit.launch.sweep import trial_name

        index = int(str(trial.experiment_tag).split("_", 1)[0]) - self.first_index
        return trial_name(index, [f"{k}={short(trial.config.get(k))}" for k in self.keys], self.keys)


def tune_storage(base: str) -> tuple[str, Any]:
    """Tune's ``storage_path`` and ``storage_filesystem`` for a sweep in ``base`` (any fsspec URL)."""
    if storage.is_local(base):
        return base, None
    import pyarrow.fs

    fs, path = storage.filesystem(base)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _command(plan: Plan) -> dict[str, Any]:
    return {"fixed": plan.fixed, "params": [dataclasses.asdict(p) for p in plan.params],
            "options": dataclasses.asdict(plan.options)}


def _check_same_command(plan: Plan, exists: bool) -> None:
    """The experiment directory holds this sweep (resume it) or none (record it)."""
    url = storage.join(plan.base, EXPERIMENT, COMMAND_FILE)
    fs, path = storage.filesystem(url)
    mine = json.loads(json.dumps(_command(plan)))
    if exists:
        text = rundir.read_bytes(url)
        if text is not None and json.loads(text) != mine:
            raise ConfigError(f"{plan.base} holds another sweep (its command differs); run the same command "
                              "to resume it, or pick another run_dir")
        return
    storage.retry(lambda: fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True), what=url)
    storage.retry(lambda: fs.pipe_file(path, json.dumps(mine, indent=1).encode()), what=url)


def tune_sweep(data: dict[str, Any], overrides: list[str], config_dirs: list[str] = ()) -> int:
    """Plans the sweep, runs it on Ray Tune, prints the table; the sweep's exit code."""
    from trainkit.launch.prepare import prepare
    from trainkit.launch.ray.session import check_resources, ray_session

    plan = plan_sweep(data, overrides, list(config_dirs))
    plan.cfg.run_dir = plan.base
    prepare(plan.cfg)  # stores reachable, embedded data written once: before any trial starts
    lc = plan.cfg.launcher
    per_trial = lc.world_size * lc.cpus_per_worker
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_EVERY_S)
    want = min(plan.options.max_concurrent or plan.trials, plan.trials)
    with ray_session(lc.address, cpus=per_trial * want) as own:
        check_resources(lc, own_cluster=own and not lc.address)
        results = run_experiment(plan)
    text, code = table(plan, results)
    print(text, flush=True)
    return code


def concurrency(plan: Plan) -> int:
    """Trials at once: ``sweep.max_concurrent``, or as many as the connected cluster holds."""
    import ray

    total = ray.cluster_resources()
    lc = plan.cfg.launcher
    fits = [total.get("CPU", 0) // max(lc.world_size * lc.cpus_per_worker, 1e-9)]
    if lc.gpus_per_worker:
        fits.append(total.get("GPU", 0) // (lc.world_size * lc.gpus_per_worker))
    held = int(max(1, min(fits)))
    return min(plan.options.max_concurrent or held, held, plan.trials)


def run_experiment(plan: Plan) -> Any:
    from ray import tune

    from trainkit.components import SCHEDULERS, SEARCHERS
    from trainkit.launch.ray.launcher import PROPAGATE_PREFIXES
    from trainkit.launch.tune.trainable import TrialRun

    opts, lc = plan.options, plan.cfg.launcher
    searcher = SEARCHERS.get(opts.search.name, "sweep.search")(opts.search)
    scheduler = SCHEDULERS.get(opts.scheduler.name, "sweep.scheduler")(opts.scheduler)
    # The trials find the same stores and embedded data as this driver (not credentials: those
    # come from the node's role, as for launcher=ray).
    env = {k: v for k, v in os.environ.items() if k.startswith(PROPAGATE_PREFIXES)}
    spec = {"base": plan.base, "fixed": plan.fixed, "config_dirs": plan.config_dirs, "env": env,
            "stop_grace_s": STOP_GRACE_S, "metric": opts.metric,
            "last_step": scheduler.last_step(plan.cfg.trainer.max_steps)}
    resources = {"CPU": lc.world_size * lc.cpus_per_worker}
    if lc.gpus_per_worker:
        resources["GPU"] = lc.world_size * lc.gpus_per_worker
    trainable = tune.with_resources(tune.with_parameters(TrialRun, spec=spec), resources)
    storage_path, fs = tune_storage(plan.base)
    path = storage.join(plan.base, EXPERIMENT) if fs is not None else os.path.join(plan.base, EXPERIMENT)
    restore_path = storage.join(storage_path, EXPERIMENT) if fs is not None else path
    exists = tune.Tuner.can_restore(restore_path, storage_filesystem=fs)
    _check_same_command(plan, exists)
    parallel = concurrency(plan)
    print(f"ray: running {parallel} trial(s) at a time", flush=True)
    if exists:
        print(f"sweep: resuming {path} (finished trials keep their results)", flush=True)
        tuner = tune.Tuner.restore(restore_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        keys = [p.key for p in plan.params]
        param_space, search_alg = searcher.build(plan.params)
        num_samples = opts.num_samples
        print(f"sweep: {opts.search.name} search over {', '.join(keys)}, {num_samples} sample(s), "
              f"scheduler {opts.scheduler.name}, metric {opts.metric} ({opts.mode}), in {plan.base}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=opts.metric, mode=opts.mode, num_samples=num_samples, max_concurrent_trials=parallel,
                search_alg=search_alg, scheduler=scheduler.build(plan.cfg.trainer.max_steps),
                trial_dirname_creator=TrialDirname(searcher.first_index, keys),
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=storage_path, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=lc.max_failures),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                callbacks=[TrialLines()], verbose=0,
            ),
        )
    return tuner.fit()


class TrialLines(Callback):
    """One line per trial as it ends (Tune's own progress tables are off: ``verbose=0``)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step", "-")
        print(f"sweep: {trial.custom_dirname} ended at step {step}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"sweep: {trial.custom_dirname} failed (Tune retries it per launcher.max_failures)",
              flush=True)


def status_of(metrics: dict[str, Any], error: Any, summary: dict[str, Any] | None) -> str:
    """done (the run wrote its summary), stopped (by the scheduler), config error or failed."""
    from trainkit.launch.tune.trainable import EXIT_KEY

    if error is not None:
        return "failed"
    if metrics.get(EXIT_KEY) == EXIT_CONFIG:
        return "config error"
    return "done" if summary is not None else "stopped"


def table(plan: Plan, results: Any) -> tuple[str, int]:
    """Each trial's params, final metrics, cost, status and run_dir; and the sweep's exit code."""
    from trainkit.launch.sweep import COLUMNS, cell, columns, cost_cell
    from trainkit.launch.tune.trainable import MESSAGE_KEY

    keys = [p.key for p in plan.params]
    rows, notes, statuses = [], [], []
    for r in results:
        name = os.path.basename(str(r.path).rstrip("/"))
        run_dir = storage.join(plan.base, name)
        metrics = dict(r.metrics or {})
        found = rundir.read_summary(run_dir)
        summary = found or {}
        status = status_of(metrics, r.error, found)
        statuses.append(status)
        values = {**metrics, **summary}
        values.setdefault("steps", metrics.get("step"))
        params = " ".join(f"{k}={short(r.config.get(k))}" for k in keys)
        index = name.split("-", 2)[1] if name.startswith("trial-") else name
        rows.append((int(index) if index.isdigit() else 0,
                     [index, params, *(cell(values.get(c)) for c in COLUMNS), cost_cell(summary), status, run_dir]))
        if r.error is not None:
            notes.append(f"trial {index}: {str(r.error).strip().splitlines()[-1]}")
        elif metrics.get(MESSAGE_KEY):
            notes.append(f"trial {index}: {metrics[MESSAGE_KEY]}")
    header = ["trial", "params", *COLUMNS, "cost", "status", "run_dir"]
    lines = columns([header, *(row for _, row in sorted(rows, key=lambda x: x[0]))])
    best = _best(plan, results)
    text = "\n".join(["", f"sweep results ({plan.options.metric}, {plan.options.mode}):", *lines, *notes, *best])
    if "config error" in statuses:
        return text, EXIT_CONFIG
    return text, EXIT_FAILED if "failed" in statuses else 0


def _best(plan: Plan, results: Any) -> list[str]:
    from trainkit.launch.sweep import cell

    try:
        best = results.get_best_result()
    except RuntimeError:  # no trial reported the metric
        return []
    value = (best.metrics or {}).get(plan.options.metric)
    return [f"best: {os.path.basename(str(best.path).rstrip('/'))} ({plan.options.metric} {cell(value)})"]
