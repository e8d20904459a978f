"""Recipes ship inside the wheel, and users add their own directory without editing ours."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launching import ROOT, launch


def test_recipes_work_from_installed_wheel(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("trainkit-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import trainkit, sys; print(trainkit.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=outside, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    result = subprocess.run([sys.executable, "-m", "trainkit.launch", "recipe=gpt", "strategy=fsdp", "--cfg"],
                            cwd=outside, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "task: gpt" in result.stdout and "name: fsdp" in result.stdout


def test_user_recipe_directory(tmp_path: Path) -> None:
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "tinygpt.yaml").write_text(
        "# @package _global_\ndefaults:\n  - gpt\nrecipe: tinygpt\nmodel:\n  n_layer: 1\n"
    )
    result = launch("--config-dir", str(tmp_path), "recipe=tinygpt", "--cfg", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "recipe: tinygpt" in result.stdout and "n_layer: 1" in result.stdout and "task: gpt" in result.stdout
    bad = launch("--config-dir", str(tmp_path), "recipe=nope", timeout=60)
    assert bad.returncode == 2
    assert "recipe='nope' is unknown; valid: gpt, resnet, tinygpt" in bad.stderr
