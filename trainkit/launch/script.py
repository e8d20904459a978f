"""``python -m trainkit.launch script=train.py key=value ... -- --script --args``: a user's own script.

The script runs in every worker the launcher starts (local processes, a Ray worker group, one
local launcher per Slurm node), exactly where a recipe's training function would: the
launchers, their exit codes, the failure reported once and the resume rule are the same code.
Everything after the first ``--`` is the script's ``sys.argv[1:]``, untouched.

The command line's ``key=value`` settings (and ``strategy=``/``launcher=``) are handed to the
workers in ``TRAINKIT_LAUNCH_SETTINGS``; each ``trainkit.Run`` the script builds lays them over
its own config, so ``run_dir=...`` or ``trainer.max_steps=...`` on the command line win over the
script's, as over a recipe. Keys the command line does not name are the script's own, so only
the named ones are checked here; the Run checks the whole config in each worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from trainkit import storage
from trainkit.config import LAUNCH_SETTINGS_ENV, Config
from trainkit.errors import ConfigError

# The script and its arguments, for the workers: {"path": ..., "args": [...]}.
SCRIPT_ENV = "TRAINKIT_SCRIPT"
# Sections picked as a whole on the command line (``strategy=accelerate``).
GROUPS = ("strategy", "launcher")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's arguments, the script's): the script's start after the first ``--``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def pop_script(overrides: list[str]) -> tuple[str, list[str]]:
    """The ``script=`` value (empty when none) and the other overrides."""
    scripts = [o for o in overrides if o.partition("=")[0] == "script"]
    rest = [o for o in overrides if o.partition("=")[0] != "script"]
    if len(scripts) > 1:
        raise ConfigError("script= is given twice; name one script")
    path = scripts[0].partition("=")[2] if scripts else ""
    if scripts and not path:
        raise ConfigError("script= needs a path, e.g. script=train.py")
    return path, rest


def check_script(path: str, overrides: list[str]) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"script={path}: no such file")
    if any(o.partition("=")[0].lstrip("+~") in ("recipe", "task") for o in overrides):
        raise ConfigError(f"script={path} runs your own script; recipe= and task= pick a recipe instead: give one")


def settings(data: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The composed values of exactly the keys the command line names, as a nested mapping.

    The launcher's section is always included (the Run checks the world size against it); a
    group picked whole (``strategy=ddp``) is sent whole. A local run_dir is made absolute:
    workers (Ray's) may start elsewhere.
    """
    out: dict[str, Any] = {"launcher": dict(data["launcher"])}
    for item in overrides:
        key, sep, _ = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra"):
            continue
        parts = key.split(".")
        node, value = out, data
        for part in parts:
            value = value[part]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    run_dir = out.get("run_dir")
    if run_dir and storage.is_local(run_dir):
        out["run_dir"] = os.path.abspath(storage.local_path(run_dir))
    return out


def launcher_config(data: dict[str, Any], overrides: list[str]) -> Config:
    """The launcher's own config, checked like a recipe's.

    The batch size is the script's unless the command line names it: the launcher then checks
    one that fits its world size instead of the default.
    """
    from trainkit.config import load_config
    from trainkit.distributed import expected_world_size

    if "data.batch_size" not in {o.partition("=")[0].lstrip("+~") for o in overrides}:
        lc = data["launcher"]
        world = expected_world_size(int(lc.get("workers", 1)) * int(lc.get("nodes", 1)))
        data = {**data, "data": {**data["data"], "batch_size": world * int(data["trainer"]["grad_accum"])}}
    return load_config(data)


@contextlib.contextmanager
def environment(path: str, script_args: list[str], job_settings: Mapping[str, Any]) -> Iterator[None]:
    """The workers' environment for this script (local workers inherit it, Ray propagates TRAINKIT_*)."""
    saved = {k: os.environ.get(k) for k in (SCRIPT_ENV, LAUNCH_SETTINGS_ENV)}
    os.environ[SCRIPT_ENV] = json.dumps({"path": os.path.abspath(path), "args": list(script_args)})
    os.environ[LAUNCH_SETTINGS_ENV] = json.dumps(job_settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def add_settings(extra: Mapping[str, Any]) -> None:
    """Adds ``extra``'s sections to a script job's settings in this worker (no-op for a recipe)."""
    raw = os.environ.get(LAUNCH_SETTINGS_ENV)
    if raw is None:
        return
    current = json.loads(raw)
    for section, values in extra.items():
        current[section] = {**current.get(section, {}), **values}
    os.environ[LAUNCH_SETTINGS_ENV] = json.dumps(current)


def launched_script() -> dict[str, Any] | None:
    """The script this worker runs, or None when it runs a recipe."""
    raw = os.environ.get(SCRIPT_ENV)
    return json.loads(raw) if raw else None


def run_script(spec: Mapping[str, Any]) -> None:
    """Runs the script as ``python path args...`` would, as ``__main__``; checks it made a Run.

    ``sys.exit(0)`` is an ordinary end; another code ends the worker with it (``Preempted``
    is 75). A script that returns without having built a ``trainkit.Run`` (or, for an Accelerate
    loop, a :class:`~trainkit.checkpoint.accelerate.AcceleratorCheckpoints`) got none of what the
    launcher promises (resume, agreement, metrics): that is a config error, not a success.
    """
    from trainkit import config
    from trainkit.checkpoint import accelerate

    path, args = spec["path"], list(spec["args"])
    before = (config.launched_runs, accelerate.created)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    if (config.launched_runs, accelerate.created) == before:
        raise ConfigError(f"script={path} never created a trainkit.Run (or AcceleratorCheckpoints); "
                          "see docs/quickstart.md, 'Bring your script'")
