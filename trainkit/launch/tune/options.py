"""``sweep.*``: how a Ray Tune sweep searches, from a sweep file and the command line.

A sweep file is ``sweep/<name>.yaml`` in the recipe search path (``recipes/sweep/`` here, or
a ``--config-dir``), picked with ``sweep=<name>``; ``sweep.<key>=value`` on the command line
sets or replaces any of its keys. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from trainkit.errors import ConfigError
from trainkit.options import Options, build, options_class, positive
from trainkit.launch.tune.search import SchedulerOptions, SearchOptions

GROUP = "sweep"
# Keys naming a component: ``sweep.search=optuna`` picks it with its default options.
COMPONENTS = ("search", "scheduler")


@dataclass
class SweepOptions(Options):
    # The search algorithm (trainkit.components.SEARCHERS) and its options.
    search: SearchOptions = field(default_factory=lambda: SearchOptions(name="random"))
    # The trial scheduler (trainkit.components.SCHEDULERS) and its options.
    scheduler: SchedulerOptions = field(default_factory=lambda: SchedulerOptions(name="none"))
    # A key of the trials' metrics records (metrics.jsonl) that the search and the scheduler optimise.
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    # Trials to run (for search=grid: repeats of the whole grid).
    num_samples: int = 4
    # Trials running at once; 0: as many as the cluster holds.
    max_concurrent: int = 0
    # Keys swept: key -> {choice|grid|uniform|loguniform: [...]} (trainkit.launch.tune.space).
    space: dict[str, Any] = field(default_factory=dict)
    # Fixed overrides every trial starts from (before the command line's).
    overrides: list[str] = field(default_factory=list)

    def check(self, cfg: Any) -> None:
        positive("sweep.num_samples", self.num_samples)
        positive("sweep.max_concurrent", self.max_concurrent, allow_zero=True)
        if not self.metric:
            raise ConfigError("sweep.metric must name a metrics key (loss, eval_loss, ...)")
        self.scheduler.check_steps(cfg.trainer.max_steps)


def _component(kind: str, data: Any, registry: Any, base: type) -> Any:
    """``search``/``scheduler`` as a name or a mapping with ``name``: its class's own options."""
    if isinstance(data, str):
        data = {"name": data}
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict) or not data.get("name"):
        raise ConfigError(f"sweep.{kind} must be a name ({', '.join(registry.names())}) or a mapping with name")
    cls = options_class(registry.get(str(data["name"]), f"sweep.{kind}"), base, f"sweep.{kind}")
    return build(cls, data, f"sweep.{kind}")


def sweep_options(data: dict[str, Any]) -> SweepOptions:
    """The typed options of a composed ``sweep`` mapping; one line naming the key when wrong."""
    from trainkit.components import SCHEDULERS, SEARCHERS

    data = dict(data)
    search = _component("search", data.pop("search", "random"), SEARCHERS, SearchOptions)
    scheduler = _component("scheduler", data.pop("scheduler", "none"), SCHEDULERS, SchedulerOptions)
    opts = build(SweepOptions, data, GROUP)
    opts.search, opts.scheduler = search, scheduler
    return opts


def split(overrides: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(sweep file name, ``sweep.*`` overrides, the rest) from the command line."""
    name, keys, rest = None, [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        bare = key.lstrip("+~")
        if bare == GROUP and sep:
            name = value
        elif bare.startswith(GROUP + "."):
            keys.append(f"{bare}={value}")
        else:
            rest.append(item)
    return name, keys, rest


def sweep_files(config_dirs: list[str] = ()) -> dict[str, str]:
    """Every ``sweep/<name>.yaml`` in the search path: name -> path (a --config-dir wins)."""
    import trainkit.recipes

    found: dict[str, str] = {}
    for root in [*trainkit.recipes.__path__, *config_dirs]:
        folder = os.path.join(root, GROUP)
        if os.path.isdir(folder):
            for entry in sorted(os.listdir(folder)):
                if entry.endswith(".yaml"):
                    found[entry[: -len(".yaml")]] = os.path.join(folder, entry)
    return found


def load(name: str | None, keys: list[str], config_dirs: list[str] = ()) -> dict[str, Any]:
    """The sweep file ``name`` (if any) with ``sweep.*`` overrides merged in, as a plain mapping."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.create({})
    if name is not None:
        files = sweep_files(config_dirs)
        if name not in files:
            raise ConfigError(f"sweep={name!r} is unknown; valid: {', '.join(files) or '(no sweep files)'}")
        base = OmegaConf.load(files[name])
        if GROUP in base and len(base) == 1:  # a file written with its package line as a top key
            base = base[GROUP]
    dotted = []
    for item in keys:
        key, _, value = item[len(GROUP) + 1:].partition("=")
        if key in COMPONENTS:
            base[key] = {"name": value}  # another algorithm: the file's options were for the old one
        else:
            dotted.append(f"{key}={value}")
    try:
        data = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(dotted)), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"sweep: {str(exc).strip().splitlines()[0]}") from exc
    assert isinstance(data, dict)
    return data
