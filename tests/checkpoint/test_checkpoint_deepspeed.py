"""DeepSpeed ZeRO-2 on 2 gloo processes: local save, upload with a manifest, download and resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import ckpt_mp
from test_checkpoint_dist import same_file

pytest.importorskip("deepspeed")

EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "trainkit" / "torch_extensions")


def _built() -> bool:
    return any(Path(EXT_DIR).glob("**/deepspeed_shm_comm*.so"))


@pytest.mark.skipif(not _built(), reason="DeepSpeed shm op not built (scripts/setup.sh builds it, ~40 s; --runslow builds it here)")
def test_zero2_resume_is_bitwise_on_s3(s3_server, s3_url, tmp_path):
    _zero2(s3_server, s3_url, tmp_path)


@pytest.mark.slow
def test_zero2_resume_cold_build(s3_server, s3_url, tmp_path):
    """Same test, paying DeepSpeed's one-time JIT build of its shm op when it is not cached."""
    _zero2(s3_server, s3_url, tmp_path)


def _zero2(s3_server, s3_url, tmp_path):
    out = tmp_path / "out"
    env = {"TORCH_EXTENSIONS_DIR": EXT_DIR}
    common = {"root": s3_url, "steps": 4, "out": str(out), "storage": {"s3": s3_server.storage_options}}
    ckpt_mp.run("ds_train", 2, {**common, "save_at": [2], "tag": "a"}, tmp_path, env=env, timeout=300)
    ckpt_mp.run("ds_train", 2, {**common, "load": True, "tag": "b"}, tmp_path, env=env, timeout=300)
    assert json.loads((out / "a_stats.json").read_text())["steps"] == [2]
    same_file(out / "a_final.safetensors", out / "b_final.safetensors")
