"""A strategy, a launcher and a logger of one's own, named by import path in a recipe under
``--config-dir``: resolved, validated and run exactly like the built-ins (docs/architecture.md)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from launching import RESNET_TINY, launch

PLUGIN = '''
import json
import os
from dataclasses import dataclass

from trainkit.errors import ConfigError
from trainkit.launch.base import Launcher
from trainkit.launch.local import LocalLauncher, LocalOptions
from trainkit.metrics.loggers import LoggerOptions
from trainkit.strategies.ddp import DDPOptions, DDPStrategy


@dataclass
class TaggedOptions(DDPOptions):
    tag: str = "plain"

    def check(self, cfg):
        super().check(cfg)
        if not self.tag:
            raise ConfigError("strategy.tag must not be empty")


class TaggedDDP(DDPStrategy):
    Options = TaggedOptions

    def wrap(self, model, units):
        with open(os.path.join(os.environ["PLUG_OUT"], f"strategy-{self.dist.rank}.json"), "w") as f:
            json.dump({"tag": self.options.tag, "world": self.dist.world_size}, f)
        return super().wrap(model, units)


@dataclass
class NotedOptions(LocalOptions):
    note: str = ""


class NotedLauncher(Launcher):
    Options = NotedOptions

    def run(self, cfg):
        with open(os.path.join(os.environ["PLUG_OUT"], "launcher.json"), "w") as f:
            json.dump({"note": cfg.launcher.note, "workers": cfg.launcher.workers}, f)
        return LocalLauncher().run(cfg)


@dataclass
class LinesOptions(LoggerOptions):
    path: str = ""


class LinesLogger:
    Options = LinesOptions

    def __init__(self, path):
        self.file = open(path, "a")

    def log(self, record, step):
        self.file.write(json.dumps({"step": step, "loss": record["loss"]}) + "\\n")

    def close(self):
        self.file.close()
'''


def _plugin_dir(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    (root / "recipe").mkdir(parents=True, exist_ok=True)
    (root / "strategy").mkdir(exist_ok=True)
    (root / "launcher").mkdir(exist_ok=True)
    (root / "plugmod.py").write_text(PLUGIN)
    (root / "strategy" / "tagged.yaml").write_text("# @package strategy\nname: plugmod:TaggedDDP\ntag: plain\n")
    (root / "launcher" / "noted.yaml").write_text(
        "# @package launcher\nname: plugmod:NotedLauncher\nworkers: 2\nnote: hello\n")
    (root / "recipe" / "plugged.yaml").write_text(textwrap.dedent(f"""\
        # @package _global_
        defaults:
          - resnet
          - override /strategy: tagged
          - override /launcher: noted
          - _self_
        recipe: plugged
        trainer:
          loggers: ["plugmod:LinesLogger"]
          logger_options:
            "plugmod:LinesLogger": {{path: "{tmp_path}/lines.jsonl"}}
        """))
    return root


def _run(tmp_path: Path, *overrides: str):
    root = _plugin_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {"PLUG_OUT": str(out), "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    tiny = [o for o in RESNET_TINY if not o.startswith("recipe=")]
    return launch("--config-dir", str(root), "recipe=plugged", *tiny, "trainer.max_steps=3",
                  f"run_dir={tmp_path}/run", *overrides, env=env), out


def test_plugins_from_a_config_dir_run_like_builtins(tmp_path):
    result, out = _run(tmp_path, "strategy.tag=mine")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "launcher.json").read_text()) == {"note": "hello", "workers": 2}
    for rank in (0, 1):
        assert json.loads((out / f"strategy-{rank}.json").read_text()) == {"tag": "mine", "world": 2}
    lines = [json.loads(x) for x in (tmp_path / "lines.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "plugmod:TaggedDDP" and summary["world_size"] == 2


def test_plugin_options_are_checked_like_builtins(tmp_path):
    result, out = _run(tmp_path, "strategy.tag=")
    assert result.returncode == 2 and "strategy.tag must not be empty" in result.stderr
    result, _ = _run(tmp_path, "launcher.nope=1")
    assert result.returncode == 2
    assert "unknown key 'launcher.nope'" in result.stderr and "note" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists() and not (out / "launcher.json").exists()


def test_logger_options_are_checked_against_the_loggers_own():
    import pytest

    from trainkit.errors import ConfigError
    from trainkit.metrics.loggers import check_logger_options

    check_logger_options(["tensorboard"], {"tensorboard": {"flush_seconds": 5}})
    with pytest.raises(ConfigError, match="unknown key 'trainer.logger_options.tensorboard.colour'; valid keys"):
        check_logger_options(["tensorboard"], {"tensorboard": {"colour": "red"}})
    with pytest.raises(ConfigError, match="flush_seconds=0.0 must be > 0"):
        check_logger_options(["tensorboard"], {"tensorboard": {"flush_seconds": 0}})
    with pytest.raises(ConfigError, match="trainer.logger_options.wandb: no such logger in trainer.loggers"):
        check_logger_options(["tensorboard"], {"wandb": {"project": "p"}})
