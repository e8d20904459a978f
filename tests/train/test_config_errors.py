"""Bad input fails before any worker starts: exit code 2 and one readable line."""

from __future__ import annotations

import pytest

from launching import launch, launch_here


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["recipe=nope"], "recipe='nope' is unknown; valid: gpt, resnet"),
        (["strategy=nope"], "strategy='nope' is unknown; valid: accelerate, auto, ddp, deepspeed, fsdp, single"),
        (["trainer.max_step=5"], "unknown key 'trainer.max_step'; valid keys in trainer: max_steps"),
        (["launcher.workers=-1"], "launcher.workers=-1 must be > 0"),
        (["model.widht=8"], "unknown key 'model.widht'; valid keys in model: width"),
        (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid; valid: fp32, bf16, fp16"),
        (["data.format=mds"], "data.format='mds' is not valid; valid: auto, trainkit, parquet, webdataset"),
        (["data.prefetch=-2"], "data.prefetch=-2: -1 (sized from the store) or 0 and more"),
        (["strategy=single", "launcher.workers=2"], "strategy=single runs one process"),
        (["storage.s4.key=x"], "storage.s4: no fsspec filesystem for protocol 's4'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, overrides, expected):
    result = launch_here(*overrides, f"run_dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "run").exists(), "nothing may start for a bad config"


def test_missing_dataset_url_is_named(tmp_path):
    result = launch("recipe=resnet", f"data.url=file://{tmp_path}/none", f"run_dir={tmp_path}/r", timeout=60)
    assert result.returncode == 2
    assert f"data.url=file://{tmp_path}/none: no data set there" in result.stderr


def test_cfg_prints_resolved_config(tmp_path):
    result = launch_here("recipe=gpt", "strategy=fsdp", "trainer.max_steps=7", "--cfg")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout and "name: fsdp" in result.stdout


def test_bad_input_in_a_fresh_process_exits_2_with_one_line(tmp_path):
    """The same path as a user's shell: an interpreter of its own, nothing started."""
    result = launch("recipe=resnet", "trainer.max_step=5", f"run_dir={tmp_path}/run", timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "unknown key 'trainer.max_step'" in result.stderr and not (tmp_path / "run").exists()
