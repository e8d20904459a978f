"""script= on launcher=ray (a private Ray on 127.0.0.1): the same script, the same resume rule.

Run to step 60 on Ray, relaunched to 150: it resumes at 60 and its per-step losses equal the
local launcher's uninterrupted run bit for bit (same world size, CPU). SIGTERM to the driver
mid-run: exit 75, and the relaunch continues bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launching import ROOT, launch, metrics
from trainkit import rundir

pytest.importorskip("ray")

SCRIPT = ROOT / "docs" / "examples" / "train_script.py"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _args(run_dir: Path, steps: int, *launcher: str) -> list[str]:
    return [f"script={SCRIPT}", *launcher, "launcher.workers=2", "trainer.threads=1", f"run_dir={run_dir}",
            "trainer.log_every=1", "trainer.progress=plain", "--", "--steps", str(steps)]


@pytest.mark.slow  # ~80 s (two private Ray start-ups); test_script_launch.py is the default proof
def test_script_on_ray_relaunch_resumes_like_local(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert launch(*_args(ref, 150, "launcher=local")).returncode == 0
    run = tmp_path / "ray"
    first = launch(*_args(run, 60, "launcher=ray"), env=RAY_ENV, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "ray: 2 workers" in first.stdout
    again = launch(*_args(run, 150, "launcher=ray"), env=RAY_ENV, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from checkpoint at step 60" in again.stdout
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(ref)]


@pytest.mark.slow  # ~70 s (a private Ray start-up); test_script_launch.py is the default proof
def test_script_on_ray_sigterm_exits_75_and_resumes_bitwise(tmp_path: Path) -> None:
    """SIGTERM to the Ray driver: the workers stop at an agreed step and save, the command
    exits 75 (no group restart), and the relaunch (here on the local launcher, same run_dir)
    continues bit for bit."""
    ref = tmp_path / "ref"
    assert launch(*_args(ref, 600, "launcher=local")).returncode == 0
    run = tmp_path / "ray"
    # Workers look for the driver's stop every preemption.poll_seconds.
    ray_args = _args(run, 600, "launcher=ray", "preemption.poll_seconds=0.5")
    proc = subprocess.Popen([sys.executable, "-m", "trainkit.launch", *ray_args], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **RAY_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not ((run / rundir.METRICS).exists() and len(metrics(run)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out[-3000:]
    assert "signal SIGTERM to the driver: the workers stop at an agreed step" in out
    events = rundir.read_events(str(run))
    (stop,) = [e["step"] for e in rundir.of(events, rundir.PREEMPTED)]
    assert len(rundir.of(events, rundir.START)) == 1  # Ray did not restart the group
    again = launch(*_args(run, 600, "launcher=local"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from checkpoint at step {stop}" in again.stdout
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(ref)]
