"""``python -m trainkit.tasks write TASK URL [model.KEY=VALUE ...] [storage.PROTOCOL.OPTION=VALUE ...]``.

Writes a task's data set, the shards its recipe would prepare in the embedded store, to
``URL/train`` and ``URL/eval`` instead (``s3://``, ``gs://``, any fsspec URL), so a run can read
them with ``data.url=URL/train``. ``TASK`` is a built-in task (``resnet``, ``gpt``: the recipes
of the same names) or a ``pkg.module:TASK`` path.

The data set depends only on the task and its ``model.*`` keys, so no recipe is composed: a
built-in recipe's ``model`` section is its task's defaults (a test holds them equal), and
this command needs nothing above the tasks themselves.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainkit import storage
from trainkit.components import TASKS
from trainkit.errors import ConfigError, TrainkitError
from trainkit.options import build
from trainkit.tasks.base import write_data

USAGE = "usage: python -m trainkit.tasks write TASK URL [model.KEY=VALUE ...] [storage.PROTOCOL.OPTION=VALUE ...]"
SECTIONS = ("model", "storage")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``model`` and ``storage`` from ``key=value`` items (values read as YAML, like Hydra's)."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key.split(".", 1)[0] not in SECTIONS or "." not in key:
            raise ConfigError(f"{item!r}: only model.KEY=VALUE and storage.PROTOCOL.OPTION=VALUE change what is written")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc
    assert isinstance(parsed, dict)
    return parsed


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "write":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        task = TASKS.get(argv[1], "task")
        overrides = parse_overrides(argv[3:])
        model = dataclasses.asdict(build(task.model_config, overrides.get("model", {}), "model"))
        storage.configure(overrides.get("storage", {}))
        for url in write_data(task, model, argv[2]):
            print(url)
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
