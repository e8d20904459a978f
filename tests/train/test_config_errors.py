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
        (["data.format=tfrecord"], "data.format='tfrecord' is not valid; valid: auto, trainkit, parquet, arrow, "
                                   "webdataset, mds"),
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
    assert f"data.url=file://{tmp_path}/none: no dataset at file://{tmp_path}/none" in result.stderr


def test_every_reader_is_a_data_format_and_a_parquet_folder_passes_the_launch_check(tmp_path):
    """The config's choices are the readers' names, and the launcher checks a dataset the way the
    loader opens it (any reader's layout), not by looking for trainkit's index.json."""
    import typing

    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainkit.config import DataConfig
    from trainkit.data.source import FORMATS
    from trainkit.launch.compose import compose_config
    from trainkit.launch.prepare import prepare

    assert typing.get_args(typing.get_type_hints(DataConfig)["format"]) == ("auto", *FORMATS)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"label": [1, 2, 3]}), tmp_path / "pq" / "part-0.parquet")
    prepare(compose_config(["recipe=resnet", f"data.url=file://{tmp_path}/pq", f"run_dir={tmp_path}/r"]))


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
