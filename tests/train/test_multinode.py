"""launcher.nodes=2: two launchers (as two Slurm tasks would be) meet at one rendezvous."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launching import RESNET_TINY, ROOT, losses
from trainkit.distributed import free_port


def test_two_launchers_form_one_job(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINKIT_STORE": str(ROOT / ".cache" / "test-store"),
           "TRAINKIT_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "TRAINKIT_RDZV_ID": "test-job",
           "TRAINKIT_LOCAL_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "trainkit.launch", *RESNET_TINY, "strategy=ddp", "launcher.nodes=2",
           "launcher.workers=1", "trainer.max_steps=6", f"run_dir={run}"]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(losses(run)) == 6
    assert '"world_size": 2' in (run / "summary.json").read_text()


def test_multinode_without_rendezvous_is_a_config_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINKIT_RDZV", "MASTER_"))}
    result = subprocess.run([sys.executable, "-m", "trainkit.launch", *RESNET_TINY, "strategy=ddp",
                             "launcher.nodes=2", f"run_dir={tmp_path}/r"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "launcher.nodes=2 needs TRAINKIT_RDZV_ENDPOINT" in result.stderr
