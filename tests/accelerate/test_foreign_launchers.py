"""A trainkit script under launchers that are not trainkit's: ``accelerate launch`` and ``torchrun``.

What they keep: the world size, ``--mixed_precision`` (ACCELERATE_MIXED_PRECISION), the
emergency save on SIGTERM and a "preempted" event. What they lose: exit 75 (their agent turns
a worker's 75 into 1), so a wrapper reads the event instead (docs/clusters.md, the table).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launching import ROOT, launch
from trainkit import rundir
from trainkit.distributed import free_port

SCRIPT = ROOT / "docs" / "examples" / "train_script.py"
BIN = Path(sys.executable).parent
LAUNCHERS = {
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--mixed_precision", "bf16", "--main_process_port"],
    "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port"],
}


@pytest.mark.parametrize("launcher", [
    "accelerate",
    pytest.param("torchrun", marks=pytest.mark.slow),  # the same elastic agent underneath
])
def test_sigterm_under_a_foreign_launcher_saves_and_records_preempted(tmp_path: Path, launcher: str) -> None:
    run = tmp_path / "runs" / "my-script"  # the script's own run_dir, relative to its working directory
    cmd = [*LAUNCHERS[launcher], str(free_port()), str(SCRIPT), "--steps", "3000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ((run / rundir.METRICS).exists() and len(rundir.read_metrics(str(run))) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out  # what the agent makes of the workers' 75 (documented)
    events = rundir.read_events(str(run))
    (start,) = rundir.of(events, rundir.START)
    assert start["world_size"] == 2
    (preempted,) = rundir.of(events, rundir.PREEMPTED)
    assert preempted["reason"] == "signal SIGTERM"
    assert preempted["step"] in [e["step"] for e in rundir.of(events, rundir.CHECKPOINT_COMMITTED)]
    precision = "bf16" if launcher == "accelerate" else "fp32"
    assert f"precision: {precision}" in (run / rundir.CONFIG).read_text()


def test_accelerate_precision_contradicting_the_config_is_one_line(tmp_path: Path) -> None:
    result = launch(f"script={SCRIPT}", "launcher.workers=2", f"run_dir={tmp_path}", "trainer.precision=fp16",
                    "--", "--steps", "3", env={"ACCELERATE_MIXED_PRECISION": "bf16"}, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "ACCELERATE_MIXED_PRECISION=bf16 contradicts trainer.precision=fp16" in line, line


@pytest.mark.slow  # ~20 s; strategy=accelerate's default proof is test_strategy.py (trainkit's launcher)
def test_strategy_accelerate_under_accelerate_launch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [*LAUNCHERS["accelerate"], str(free_port()), str(Path(__file__).parent / "accelerate_strategy_script.py"),
           str(run)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "accelerate: 2 processes (MULTI_CPU), mixed precision bf16" in result.stdout
    curve = [r["loss"] for r in rundir.read_metrics(str(run))]
    assert len(curve) == 20 and sum(curve[-4:]) < 0.7 * sum(curve[:4]), curve
    assert rundir.read_summary(str(run))["world_size"] == 2
