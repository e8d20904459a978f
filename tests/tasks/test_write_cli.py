"""``python -m trainkit.tasks write``: a task's data set to a store, without composing a recipe."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from trainkit.components import TASKS
from trainkit.launch.compose import compose_config


@pytest.mark.parametrize("recipe", ["resnet", "gpt"])
def test_a_builtin_recipes_model_is_its_tasks_defaults(recipe):
    """What lets the command take the task's defaults for the recipe of the same name."""
    cfg = compose_config([f"recipe={recipe}"])
    assert cfg.task == recipe
    assert cfg.model == dataclasses.asdict(TASKS.get(recipe, "task").model_config())


def _write(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainkit.tasks", "write", *args], capture_output=True, text=True,
                          timeout=300)


def test_writes_each_split_with_the_model_overrides(tmp_path):
    url = f"file://{tmp_path}/digits"
    done = _write("resnet", url, "model.image_size=8", "model.blocks=[1,1]", "storage.file.auto_mkdir=true")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"{url}/train", f"{url}/eval"]
    index = json.loads((tmp_path / "digits" / "train" / "index.json").read_text())
    assert index["num_samples"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["resnet", "URL", "model.bogus=1"], "unknown key 'model.bogus'"),
    (["resnet", "URL", "trainer.max_steps=3"], "only model.KEY=VALUE and storage.PROTOCOL.OPTION=VALUE"),
    (["nosuch", "URL"], "task='nosuch' is unknown; valid:"),
])
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path, args, message):
    done = _write(*[a.replace("URL", f"file://{tmp_path}") for a in args])
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
