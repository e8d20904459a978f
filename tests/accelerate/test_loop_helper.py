"""AcceleratorCheckpoints: an Accelerate loop (docs/examples/accelerate_loop.py) survives kills.

2 processes (trainkit's local launcher; Accelerate adopts its process group). A worker
SIGKILLed mid-run, relaunched: it continues from the last committed step. Then SIGTERM: the
processes agree on a step, save, exit 75, and the relaunch continues from exactly there. The
per-step losses of the whole run equal an uninterrupted one's bit for bit, data position included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launching import ROOT, launch
from trainkit import rundir

SCRIPT = ROOT / "docs" / "examples" / "accelerate_loop.py"
STEPS = 400  # after the SIGTERM the run must outlast the agreement's period (0.5 s; ~4 ms steps)


def _args(run_dir: Path) -> list[str]:
    return [f"script={SCRIPT}", "launcher.workers=2", "--", "--steps", str(STEPS), "--run-dir", str(run_dir)]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in rundir.read_metrics(str(run_dir))]


def _events(run_dir: Path) -> list[dict]:
    return rundir.read_events(str(run_dir)) if (run_dir / rundir.EVENTS).exists() else []


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainkit.launch", *_args(run_dir)], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what}: {proc.communicate()[0][-3000:]}"
        time.sleep(0.05)


@pytest.mark.rotate("e2e-resume")
def test_sigkill_and_sigterm_then_relaunch_continue_bitwise(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    result = launch(*_args(ref))
    assert result.returncode == 0, result.stdout + result.stderr
    reference = _losses(ref)
    assert len(reference) == STEPS and reference[-1] < 0.2 * reference[0]

    run = tmp_path / "run"
    proc = _start(run)
    _wait(lambda: rundir.of(_events(run), rundir.CHECKPOINT_COMMITTED), proc, "first commit")
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    workers[-1].send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == 1
    durable = max(e["step"] for e in rundir.of(_events(run), rundir.CHECKPOINT_COMMITTED))

    proc = _start(run)
    _wait(lambda: rundir.of(_events(run), rundir.RESTORE) and len(_losses(run)) >= durable + 5, proc, "resume")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "exiting with code 75" in out
    ev = _events(run)
    assert rundir.of(ev, rundir.RESTORE)[0]["step"] == durable
    (stop,) = [e["step"] for e in rundir.of(ev, rundir.PREEMPTED)]
    assert stop in [e["step"] for e in rundir.of(ev, rundir.CHECKPOINT_COMMITTED)]

    result = launch(*_args(run))
    assert result.returncode == 0, result.stdout + result.stderr
    restores = rundir.of(_events(run), rundir.RESTORE)
    assert [r["step"] for r in restores] == [durable, stop] and restores[1]["recomputed_steps"] == 0
    assert _losses(run) == reference
