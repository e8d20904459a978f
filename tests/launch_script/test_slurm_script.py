"""launchers/slurm.sbatch with script=: the real launcher under a stand-in srun, SIGTERMed like Slurm does.

``srun`` here runs its command on this machine (one node, the script's 2 workers); ``scontrol``
records the requeue. Slurm's pre-emption notice (SIGTERM to the batch shell) reaches the
ranks, they save and exit 75, the script requeues; the requeued job resumes at the stop step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launching import ROOT, metrics
from trainkit import rundir

SCRIPT = ROOT / "docs" / "examples" / "train_script.py"


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else echo "scontrol $*" >> "$LOG"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path / "scontrol.log"),
            "TRAINKIT_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "2"}


@pytest.mark.slow  # ~22 s; test_script_launch.py is the default proof of script= resume
def test_slurm_script_runs_a_script_requeues_on_preemption_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = _fake_slurm(tmp_path)
    cmd = ["bash", str(ROOT / "launchers" / "slurm.sbatch"), f"script={SCRIPT}", f"run_dir={run}",
           "trainer.log_every=1", "trainer.progress=plain", "--", "--steps", "150"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(metrics(run) if (run / rundir.METRICS).exists() else []) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted (exit 75): requeueing job 7" in out
    assert (tmp_path / "scontrol.log").read_text() == "scontrol requeue 7\n"
    (stop,) = [e["step"] for e in rundir.read_events(str(run)) if e["event"] == "preempted"]

    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "finished with exit code 0" in again.stdout
    (restore,) = [e for e in rundir.read_events(str(run)) if e["event"] == "restore"]
    assert restore["step"] == stop and restore["recomputed_steps"] == 0
    assert [r["step"] for r in metrics(run)] == list(range(1, 151))
