"""Hydra composition of a recipe plus command-line overrides into a validated Config.

We use Hydra's Compose API rather than ``@hydra.main`` so that every mistake (unknown
recipe, misspelled key, bad value) becomes one line and exit code 2 before any worker
starts, and so that ``run_dir``, not Hydra's ``outputs/<date>``, is where a run lives.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainkit.config import Config, load_config, run_dir_default
from trainkit.errors import ConfigError

GROUPS = ("recipe", "strategy", "launcher")


def _register_base() -> None:
    # Every key with its default, so that any key can be overridden without Hydra's "+".
    ConfigStore.instance().store(name="trainkit_base", node=OmegaConf.create(Config().to_dict()))


def _valid_keys(node: Any) -> list[str]:
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def check_overrides(overrides: list[str]) -> None:
    """Names the valid choices for a bad group or key, in one line each."""
    base = OmegaConf.create(Config().to_dict())
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra"):
            continue
        if key in GROUPS:
            continue  # Hydra knows every search path; _explain() words its answer
        node: Any = base
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if parts[0] in ("model", "storage") and depth >= 1:
                break  # free-form here; the task's own schema checks model.* later
            if not OmegaConf.is_dict(node) or part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(
                    f"unknown key {key!r}; valid keys in {where}: {', '.join(_valid_keys(node))}"
                )
            node = node[part]


def _explain(exc: Exception, overrides: list[str]) -> ConfigError:
    """Turns Hydra's multi-line message into one line; names valid keys for a bad override."""
    text = str(exc).strip()
    first = text.splitlines()[0]
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = re.search(rf"Available options in '{group}':\n((?:\t.*\n?)*)", text)
        valid = sorted(o.strip() for o in options.group(1).splitlines() if o.strip()) if options else []
        return ConfigError(f"{group}={value!r} is unknown; valid: {', '.join(valid)}")
    prefix = "Could not override '"
    if not first.startswith(prefix):
        return ConfigError(first)
    key = first[len(prefix) :].split("'")[0]
    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") != key]
    try:
        node: Any = compose(config_name="config", overrides=rest)
        parent = key.rpartition(".")[0]
        for part in parent.split(".") if parent else []:
            node = node[part]
    except Exception:  # noqa: BLE001 - fall back to Hydra's own words
        return ConfigError(first)
    return ConfigError(f"unknown key {key!r}; valid keys in {parent or 'the top level'}: {', '.join(_valid_keys(node))}")


def compose_config(overrides: list[str], config_dirs: list[str] = ()) -> Config:
    """The validated Config for these overrides; raises ConfigError with one readable line."""
    _register_base()
    # storage.<protocol>.<option> keys are free-form fsspec options: add them if new.
    overrides = [f"++{o}" if o.startswith("storage.") else o for o in overrides]
    extra = [f"file://{os.path.abspath(d)}" for d in config_dirs]
    if extra:
        overrides = [f"hydra.searchpath=[{','.join(extra)}]", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="trainkit.recipes", version_base=None):
        check_overrides(overrides)
        try:
            composed = compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as exc:
            raise _explain(exc, overrides) from exc
    data = OmegaConf.to_container(composed, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    cfg = load_config(data)
    if not cfg.task:
        raise ConfigError("no task: pick a recipe (recipe=resnet) or set task=<name>")
    if not cfg.run_dir:
        cfg.run_dir = run_dir_default(cfg.recipe)
    return cfg
