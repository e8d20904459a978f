"""Sweeps on Ray Tune, on the loopback cluster (two 1-CPU raylets), through the real CLI:

* a 4-trial Optuna + ASHA sweep, 2 trials at a time, finishes and prints its table with a
  cost column; a trial the scheduler stopped left a committed checkpoint;
* the driver SIGKILLed mid-sweep, the same command again: the experiment resumes, the
  finished trial is not rerun, the interrupted one continues from its checkpoint, and
  numbering continues with the trial that had not started;
* (slow) the experiment and the runs on S3 (moto): the same command again restores it from
  the bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launching import RESNET_TINY, ROOT, launch, metrics
from trainkit import rundir

ONE_WORKER = [*RESNET_TINY, "launcher=ray", "launcher.workers=1", "strategy=single", "trainer.threads=1",
              "checkpoint.every_steps=10", "trainer.progress=off"]


def events(run_dir: Path) -> list[dict]:
    return rundir.read_events(str(run_dir))


def table_rows(out: str) -> tuple[list[str], list[list[str]]]:
    """The results table's header and rows (cells split on runs of spaces)."""
    lines = out[out.index("sweep results"):].splitlines()[1:]
    header = lines[0].split()
    rows = [line.split() for line in lines[2:] if line.split() and line.split()[0].isdigit()]
    return header, rows


def trial_processes(name: str) -> list[psutil.Process]:
    """The trial processes (python -m trainkit.launch.tune.trial) of the trial named ``name``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "trainkit.launch.tune.trial" in cmd and f"/{name}/" in cmd:
            found.append(p)
    return found


@pytest.mark.rotate("ray-e2e")
def test_optuna_asha_sweep_two_at_a_time(tune_cluster, tmp_path):
    base = tmp_path / "sweep"
    proc = launch("-m", *ONE_WORKER, "trainer.max_steps=60", f"launcher.address={tune_cluster.address}",
                  "sweep.search=optuna", "sweep.scheduler=asha", "sweep.scheduler.grace_period=5",
                  "sweep.num_samples=4", "sweep.max_concurrent=2", "optim.lr=tag(log,interval(1e-4,1.0))",
                  "cost.spot=true", "cost.spot_usd_per_hour=1.2", "cost.on_demand_usd_per_hour=4.1",
                  f"run_dir={base}", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "ray: running 2 trial(s) at a time" in out and "optuna search over optim.lr" in out, out[-3000:]
    header, rows = table_rows(out)
    assert header == ["trial", "params", "loss", "eval_loss", "eval_accuracy", "steps", "cost", "status", "run_dir"]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"], out[-3000:]
    spans = []
    for row in rows:
        run_dir = Path(row[-1])
        assert run_dir.parent == base and run_dir.name.startswith(f"trial-{row[0]}-lr="), row
        ev = events(run_dir)
        # Tune's own results for the trial: its first one waited for the run to start.
        results = [json.loads(line) for line in (base / "tune" / run_dir.name / "result.json").open()]
        spans.append((results[0]["timestamp"] - results[0]["time_this_iter_s"], results[-1]["timestamp"]))
        summary = rundir.read_summary(str(run_dir))
        status, cost = row[-2], row[-3]
        if status == "done":
            assert summary["steps"] == 60, (row, summary)
            usd = summary["cost_usd"]  # priced: every finished trial has its bill
            assert usd > 0 and cost == f"${usd:.4f}", (row, summary)
            assert summary["cost"]["saving_vs_on_demand_usd"] > 0, summary
        else:
            # Stopped by ASHA: the run saved at an agreed step and left; it can be resumed.
            assert status == "stopped" and summary is None and cost == "-", row
            assert rundir.of(ev, rundir.PREEMPTED) and rundir.of(ev, rundir.CHECKPOINT_COMMITTED), (row, ev[-3:])
    assert any(row[-2] == "done" for row in rows), out[-3000:]
    # Two trials ran at once (one per raylet): their spans in Tune overlap.
    spans.sort()
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    assert "best: trial-" in out


@pytest.mark.rotate("ray-e2e")
def test_sweep_resumes_after_its_driver_is_killed(tune_cluster, tmp_path):
    base = tmp_path / "sweep"
    args = ["-m", *ONE_WORKER, "trainer.max_steps=6,150,8", f"launcher.address={tune_cluster.address}",
            "sweep.max_concurrent=1", f"run_dir={base}"]
    first, second, third = (base / "trial-0-max_steps=6", base / "trial-1-max_steps=150", base / "trial-2-max_steps=8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINKIT_STORE": str(ROOT / ".cache" / "test-store")}
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "trainkit.launch", *args], stdout=out,
                                  stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 400
        while not (rundir.read_summary(str(first)) and rundir.of(events(second), rundir.CHECKPOINT_COMMITTED)):
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        assert rundir.read_summary(str(second)) is None, "trial 1 ended before the driver could be killed"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # The lost driver's trial does not train on unwatched: it is gone before the relaunch.
    deadline = time.monotonic() + 120
    while trial_processes(second.name):
        assert time.monotonic() < deadline, "trial 1's run outlived its driver"
        time.sleep(0.2)
    steps_before = [r["step"] for r in metrics(first)]

    proc = launch(*args, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, log.read_text()[-3000:] + out[-5000:]
    assert "sweep: resuming" in out, out[-3000:]
    names = sorted(p.name for p in base.iterdir() if p.name.startswith("trial-"))
    assert names == [first.name, second.name, third.name]
    _, rows = table_rows(out)
    assert [(r[0], r[-2]) for r in rows] == [("0", "done"), ("1", "done"), ("2", "done")], out[-3000:]
    # Finished before the kill: not run again.
    assert len(rundir.of(events(first), rundir.START)) == 1
    assert [r["step"] for r in metrics(first)] == steps_before
    # Interrupted: continued from its own last committed checkpoint, to the end.
    restores = rundir.of(events(second), rundir.RESTORE)
    assert restores and restores[0]["step"] > 0, events(second)[-5:]
    assert rundir.read_summary(str(second))["steps"] == 150
    assert rundir.read_summary(str(third))["steps"] == 8


@pytest.mark.slow  # a second cluster (its raylets must start with the store's settings); 218 s loaded
def test_sweep_on_an_object_store_resumes_from_it(s3_server, tmp_path):
    """Tune's experiment state and the trials' run_dirs on S3: a second run of the finished
    sweep restores it from the bucket and runs nothing again."""
    from trainkit.bench.loopback import LoopbackCluster

    base = f"{s3_server.bucket('trainkit-test')}/sweep-{tmp_path.name}"
    cluster = LoopbackCluster(workers=2)  # started after the store: its trials inherit its settings
    try:
        args = ["-m", *ONE_WORKER, "trainer.max_steps=6", "optim.lr=0.01,0.05", f"launcher.address={cluster.address}",
                f"run_dir={base}"]
        first = launch(*args, timeout=600)
        assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
        second = launch(*args, timeout=600)
        out = second.stdout + second.stderr
        assert second.returncode == 0 and "sweep: resuming" in out, out[-4000:]
        _, rows = table_rows(out)
        assert [(r[0], r[-2]) for r in rows] == [("0", "done"), ("1", "done")], out[-3000:]
        for row in rows:
            assert row[-1].startswith(base + "/trial-"), row
            assert len(rundir.of(rundir.read_events(row[-1]), rundir.START)) == 1, row
    finally:
        cluster.shutdown()
