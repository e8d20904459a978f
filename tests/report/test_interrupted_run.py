"""A real run, killed once and preempted once, then finished: the report's accounting of
attempts, crashes, preemptions and recomputed steps matches the known interruption points,
and its badput buckets and its bill (summary.json and the report alike) account for the wall
time: the buckets a run names cover all but 1 % of it."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launching import RESNET_TINY, ROOT, metrics
from trainkit.report.goodput import goodput

# Spot capacity at $0.90 an hour per worker, $3.00 on demand.
PRICES = ["cost.spot=true", "cost.per=worker", "cost.spot_usd_per_hour=0.9", "cost.on_demand_usd_per_hour=3.0"]
# Enough steps that the run outlasts the stop agreement's period (0.5 s) after the SIGTERM.
STEPS = 120
ARGS = [*RESNET_TINY, "strategy=ddp", "launcher.workers=2", f"trainer.max_steps={STEPS}", "checkpoint.every_steps=5",
        "checkpoint.async_save=false", *PRICES]


def _start(run: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINKIT_STORE": str(ROOT / ".cache" / "test-store")}
    return subprocess.Popen([sys.executable, "-m", "trainkit.launch", *ARGS, f"run_dir={run}"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and metrics(run) and metrics(run)[-1]["step"] >= step:
            return metrics(run)[-1]["step"]
        time.sleep(0.01)
    raise AssertionError(f"run never reached step {step}")


# The one real proof of the cost accounting (~35-48 s): in rotation with the other long runs.
@pytest.mark.rotate("e2e-long")
def test_goodput_and_recomputed_steps_of_an_interrupted_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(run)
    _wait_for_step(run, 12, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # a lost machine
    proc.wait()
    killed_at = metrics(run)[-1]["step"]
    # synchronous saves every 5 steps: the newest committed checkpoint is the multiple of 5 below
    restored_first = killed_at // 5 * 5

    proc = _start(run)
    _wait_for_step(run, killed_at + 6, proc)
    proc.send_signal(signal.SIGTERM)  # a spot notice
    assert proc.wait(timeout=120) == 75
    assert _start(run).wait(timeout=180) == 0

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    restores = [e for e in events if e["event"] == "restore"]
    (preempted,) = [e["step"] for e in events if e["event"] == "preempted"]
    assert [e["step"] for e in restores] == [restored_first, preempted]
    result = goodput(rows, events)
    assert result["attempts"] == 3
    assert result["crashes"] == 1 and result["preemptions"] == 1
    assert result["recomputed_steps"] == killed_at - restored_first
    assert 0 < result["goodput"] < 1
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))

    # Every bucket the interruptions cause is there, and the named ones explain the wall time.
    badput, wall = result["badput_s"], result["wall_s"]
    for bucket in ("startup", "restore", "checkpoint_save", "recompute", "emergency_save", "downtime"):
        assert badput[bucket] > 0, (bucket, badput)
    assert abs(badput["other"]) < 0.01 * wall, badput
    assert result["useful_s"] + sum(badput.values()) == pytest.approx(wall)
    # summary.json, written by the last attempt's Run.finish, accounts for the whole run the same way.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["attempts"] == 3 and summary["run_wall_s"] == pytest.approx(wall)
    assert summary["badput_s"] == pytest.approx(badput)
    # Two workers all along: the bill is the wall time on two workers at the spot price.
    cost = summary["cost"]
    assert summary["cost_usd"] == cost["usd"] == pytest.approx(wall * 2 * 0.9 / 3600)
    assert cost["lost_to_preemption_usd"] == pytest.approx(result["interruption_s"] * 2 * 0.9 / 3600)
    assert cost["saving_vs_on_demand_usd"] == pytest.approx((wall - result["interruption_s"]) * 2 * 3.0 / 3600
                                                            - cost["usd"])
    assert cost["usd_per_1k_steps"] == pytest.approx(cost["usd"] / STEPS * 1000)

    out = subprocess.run([sys.executable, "-m", "trainkit.report", str(run)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "goodput" in out.stdout and f"${cost['usd']:.4f} (spot, $0.9000/h per worker" in out.stdout
    for label in ("start-up", "checkpoint restore", "recomputed after a failure", "emergency save", "downtime"):
        assert f"  {label}" in out.stdout, label
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["cost_usd"] == pytest.approx(cost["usd"]) and report["badput_s"] == pytest.approx(badput)
    for name in ("loss.png", "throughput.png", "step_time.png", "timeline.png", "badput.png"):
        assert (run / "report" / name).stat().st_size > 1000
