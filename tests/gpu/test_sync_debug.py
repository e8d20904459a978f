"""No host-device synchronisation on a non-logging step of the recipes, on a GPU: the
steps run under ``torch.cuda.set_sync_debug_mode("error")`` (see ``sync_worker.py``).
Skipped without CUDA; ``scripts/gpu-check.sh`` runs it on a lent GPU and records the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for all cases: each recipe's data is prepared once."""
    return tmp_path_factory.mktemp("store")


@pytest.mark.parametrize("recipe,strategy", [("resnet", "single"), ("resnet", "ddp"), ("gpt", "single"),
                                             ("gpt", "fsdp")])
def test_non_logging_steps_never_wait_for_the_gpu(tmp_path, store, recipe, strategy):
    overrides = [f"recipe={recipe}", f"strategy={strategy}", "trainer.precision=bf16", "trainer.max_steps=30",
                 "trainer.log_every=10", "checkpoint.every_steps=20", "trainer.progress=off", "trainer.loggers=[]",
                 f"run_dir={tmp_path / 'run'}"]
    env = dict(os.environ, TRAINKIT_STORE=str(store),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(HERE / "sync_worker.py"), json.dumps({"overrides": overrides, "warmup": 3})],
                       env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-4000:]
    checked = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("CHECKED "))[len("CHECKED "):])
    assert checked["steps"] >= 20  # 30 steps less the warm-up, the logging and the saving ones
