"""A recipe end to end on object storage: data from the bucket, run_dir in the bucket, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fsspec
import pytest

from launching import RESNET_TINY, ROOT, launch
from trainkit.testing.servers import AZURITE_KEY


@pytest.mark.rotate("e2e-resume")
def test_recipe_on_s3_data_and_run_dir_resumes(s3_server, s3_url) -> None:
    store = [f"storage.s3.endpoint_url={s3_server.endpoint}"]
    model = ["model.width=8", "model.blocks=[1,1]", "model.image_size=8"]
    wrote = subprocess.run([sys.executable, "-m", "trainkit.tasks", "write", "resnet", f"{s3_url}/digits", *model,
                            *store], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrote.returncode == 0, wrote.stderr
    run_dir = f"{s3_url}/runs/r1"
    common = [*RESNET_TINY, "strategy=ddp", "launcher.workers=2", f"data.url={s3_url}/digits/train",
              f"run_dir={run_dir}", "checkpoint.every_steps=3", *store]
    first = launch(*common, "trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(*common, "trainer.max_steps=8")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint at step 4" in second.stdout
    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint)
    root = run_dir.removeprefix("s3://")
    rows = [json.loads(x) for x in fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert fs.exists(f"{root}/model.safetensors") and fs.exists(f"{root}/tensorboard")
    assert json.loads(fs.cat_file(f"{root}/summary.json"))["resumed_from"] == 4


def test_missing_bucket_fails_before_any_worker(s3_server) -> None:
    result = launch(*RESNET_TINY, "run_dir=s3://no-such-bucket/runs/x", f"storage.s3.endpoint_url={s3_server.endpoint}",
                    timeout=120)
    assert result.returncode == 2
    assert "run_dir=s3://no-such-bucket/runs/x: bucket 'no-such-bucket' does not exist" in result.stderr


@pytest.mark.slow  # two 2-worker launches (183 s on the shared 2-core machine); the default proofs of Azure are
# the checkpoint tests (test_checkpoint_stores.py) and the reader matrix (tests/data/test_readers.py)
def test_recipe_on_azure_data_and_run_dir_resumes(azurite_server, az_url) -> None:
    """Credentials as a user passes them in the config (``storage.az.connection_string``; the
    environment's copy blanked, so the config's must reach every process), data and run_dir
    in Azure Blob, relaunch resumes; the account key is written nowhere in the run_dir."""
    store = [f'storage.az.connection_string="{azurite_server.connection_string}"']
    env = {"AZURE_STORAGE_CONNECTION_STRING": ""}
    model = ["model.width=8", "model.blocks=[1,1]", "model.image_size=8"]
    wrote = subprocess.run([sys.executable, "-m", "trainkit.tasks", "write", "resnet", f"{az_url}/digits", *model,
                            *store], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, **env})
    assert wrote.returncode == 0, wrote.stderr
    run_dir = f"{az_url}/runs/r1"
    common = [*RESNET_TINY, "strategy=ddp", "launcher.workers=2", f"data.url={az_url}/digits/train",
              f"run_dir={run_dir}", "checkpoint.every_steps=3", *store]
    first = launch(*common, "trainer.max_steps=4", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(*common, "trainer.max_steps=6", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint at step 4" in second.stdout
    fs = azurite_server.filesystem()
    root = run_dir.removeprefix("az://")
    rows = [json.loads(x) for x in fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert json.loads(fs.cat_file(f"{root}/summary.json"))["resumed_from"] == 4
    for path in fs.find(root):
        if not path.endswith((".safetensors", ".distcp", ".metadata")) and "tensorboard" not in path:
            assert AZURITE_KEY not in fs.cat_file(path).decode(errors="replace"), path
