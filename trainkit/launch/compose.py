"""Hydra composition of a recipe plus command-line overrides into a validated Config.

We use Hydra's Compose API rather than ``@hydra.main`` so that every mistake (unknown
recipe, misspelled key, bad value) becomes one line and exit code 2 before any worker
starts, and so that ``run_dir``, not Hydra's ``outputs/<date>``, is where a run lives
(``hydra.run.dir`` and ``hydra.sweep.dir`` are refused with a line saying so).

The ``strategy`` and ``launcher`` groups are generated from the components' own
``Options`` (trainkit.components): every option of every built-in, with its default, and
nothing to keep in step by hand. A ``--config-dir`` may add its own group entries.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainkit.components import AUTO_STRATEGY, LAUNCHERS, STRATEGIES
from trainkit.config import Config, LauncherOptions, load_config, run_dir_default
from trainkit.errors import ConfigError
from trainkit.options import options_class
from trainkit.strategies.base import StrategyOptions

GROUPS = ("recipe", "strategy", "launcher")
# Sections whose keys depend on the component picked: Hydra's composed node knows them.
COMPONENT_SECTIONS = ("strategy", "launcher")
# Free-form sections: the task's model schema and fsspec's options check them later.
FREE_SECTIONS = ("model", "storage")
REFUSED = {
    "hydra.run.dir": "a run lives in run_dir: set run_dir=... instead of hydra.run.dir",
    "hydra.sweep.dir": "a sweep lives in run_dir: set run_dir=... (trials go to <run_dir>/trial-<i>-...)",
    "hydra.job.chdir": "trainkit never changes the working directory; paths stay as given",
}


def component_options() -> dict[str, dict[str, type]]:
    """Every built-in strategy and launcher with its options class, by group."""
    out: dict[str, dict[str, type]] = {"strategy": {AUTO_STRATEGY: StrategyOptions}, "launcher": {}}
    for name in STRATEGIES:
        out["strategy"][name] = options_class(STRATEGIES.get(name), StrategyOptions, "strategy")
    for name in LAUNCHERS:
        out["launcher"][name] = options_class(LAUNCHERS.get(name), LauncherOptions, "launcher")
    return out


def _register() -> None:
    store = ConfigStore.instance()
    # Every key with its default, so that any key can be overridden without Hydra's "+".
    store.store(name="trainkit_base", node=OmegaConf.create(Config().to_dict()))
    for group, entries in component_options().items():
        for name, cls in entries.items():
            store.store(group=group, name=name, node=OmegaConf.create(dataclasses.asdict(cls(name=name))))


def _valid_keys(node: Any) -> list[str]:
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def check_overrides(overrides: list[str]) -> None:
    """Names the valid choices for a bad key, in one line; refuses Hydra keys we do not honour."""
    base = OmegaConf.create(Config().to_dict())
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if key in REFUSED or any(key.startswith(k + ".") for k in REFUSED):
            raise ConfigError(f"{key}: {REFUSED[key.rsplit('.', 1)[0] if key not in REFUSED else key]}")
        if not sep or key.startswith("hydra") or key in GROUPS:
            continue  # Hydra knows every search path; _explain() words its answer
        parts = key.split(".")
        if parts[0] in COMPONENT_SECTIONS:
            continue
        node: Any = base
        for depth, part in enumerate(parts):
            if parts[0] in FREE_SECTIONS and depth >= 1:
                break
            if not OmegaConf.is_dict(node) or part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(
                    f"unknown key {key!r}; valid keys in {where}: {', '.join(_valid_keys(node))}"
                )
            node = node[part]


def _explain(exc: Exception, overrides: list[str], config_name: str) -> ConfigError:
    """Turns Hydra's multi-line message into one line; names valid keys for a bad override."""
    text = str(exc).strip()
    first = text.splitlines()[0]
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = re.search(rf"Available options in '{group}':\n((?:\t.*\n?)*)", text)
        valid = sorted(o.strip() for o in options.group(1).splitlines() if o.strip()) if options else []
        return ConfigError(f"{group}={value!r} is unknown; valid: {', '.join(valid)}")
    if re.search(r"Cannot find primary config", text):
        return ConfigError(f"--config-name={config_name}: no such config in the recipe search path")
    prefix = "Could not override '"
    if not first.startswith(prefix):
        return ConfigError(first)
    key = first[len(prefix) :].split("'")[0]
    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") != key]
    try:
        node: Any = compose(config_name=config_name, overrides=rest)
        parent = key.rpartition(".")[0]
        for part in parent.split(".") if parent else []:
            node = node[part]
    except Exception:  # noqa: BLE001 - fall back to Hydra's own words
        return ConfigError(first)
    return ConfigError(f"unknown key {key!r}; valid keys in {parent or 'the top level'}: {', '.join(_valid_keys(node))}")


def compose_raw(overrides: list[str], config_dirs: list[str] = (), *, config_name: str = "config",
                with_hydra: bool = False) -> DictConfig:
    """The Hydra-composed config (with its ``hydra`` node when asked), before validation."""
    _register()
    # storage.<protocol>.<option> keys are free-form fsspec options: add them if new.
    overrides = [f"++{o}" if o.startswith("storage.") else o for o in overrides]
    extra = [f"file://{os.path.abspath(d)}" for d in config_dirs]
    if extra:
        overrides = [f"hydra.searchpath=[{','.join(extra)}]", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="trainkit.recipes", version_base=None):
        check_overrides(overrides)
        try:
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
        except (HydraException, OmegaConfBaseException) as exc:
            raise _explain(exc, overrides, config_name) from exc


def group_choices(config_dirs: list[str] = (), *, config_name: str = "config") -> dict[str, list[str]]:
    """The options of each config group over every search path (for ``--help``)."""
    _register()
    extra = [f"file://{os.path.abspath(d)}" for d in config_dirs]
    overrides = [f"hydra.searchpath=[{','.join(extra)}]"] if extra else []
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="trainkit.recipes", version_base=None):
        loader = GlobalHydra.instance().config_loader()
        return {g: sorted(loader.get_group_options(g, config_name=config_name, overrides=overrides))
                for g in GROUPS}


def compose_data(overrides: list[str], config_dirs: list[str] = (), *, config_name: str = "config"
                 ) -> dict[str, Any]:
    """The composed config as a plain, resolved mapping, before validation."""
    composed = compose_raw(overrides, config_dirs, config_name=config_name)
    data = OmegaConf.to_container(composed, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data


def compose_config(overrides: list[str], config_dirs: list[str] = (), *, config_name: str = "config") -> Config:
    """The validated Config for these overrides; raises ConfigError with one readable line."""
    cfg = load_config(compose_data(overrides, config_dirs, config_name=config_name))
    if not cfg.task:
        raise ConfigError("no task: pick a recipe (recipe=resnet) or set task=<name>")
    if not cfg.run_dir:
        cfg.run_dir = run_dir_default(cfg.recipe)
    return cfg
