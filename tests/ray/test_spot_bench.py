"""``python -m trainkit.bench spot`` end to end on a compressed schedule (slow: ~70 s).

A real loopback Ray cluster, a real ``launcher=ray`` job, one real drain and one real hard
node kill; the accounting must hold together: every step once in the history, useful time
within the wall time, the split adding up, one restart per scheduled event.
"""

from __future__ import annotations

import pytest

from launching import ROOT
from trainkit.bench.spot import run_bench, summary_lines
from trainkit.bench.spot_schedule import parse_schedule

TINY = ["model.width=4", "model.blocks=[1,1]", "model.image_size=8", "data.batch_size=32",
        "checkpoint.every_seconds=2"]
STEPS = 6000  # long enough that both events hit a running job (~6 ms a step)


@pytest.mark.slow
def test_spot_bench_drain_and_kill(monkeypatch):
    monkeypatch.setenv("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    schedule = parse_schedule("drain@20,kill@35")
    result = run_bench(schedule, steps=STEPS, overrides=TINY, grace_s=20, replace_after_s=5, timeout_s=400,
                       log=lambda _: None)
    text = "\n".join(summary_lines(result))
    assert result["exit_code"] == 0, f"{text}\nlog: {result['launch_log']}"
    assert result["history_problems"] == [], text
    assert result["steps"] == STEPS
    assert result["not_fired"] == [] and result["unscheduled_restarts"] == 0, text
    assert [e["kind"] for e in result["events"]] == ["drain", "kill"]
    assert result["attempts"] == 3
    for event, planned in zip(result["events"], (20, 35)):
        assert event["planned_s"] == planned and event["fired_s"] >= planned
        assert event["to_first_step_s"] > event["restart_s"] > 0
    drain, kill = result["events"]
    # The notice is turned into an agreed stop with a checkpoint: nothing to recompute.
    assert drain["notice_to_stop_s"] < 20 and drain["recomputed_steps"] == 0 == drain["recompute_s"]
    assert drain["emergency_save_s"] > 0
    # A kill loses what ran since the last checkpoint, and the run knows how much.
    assert kill["notice_to_stop_s"] is None and kill["emergency_save_s"] == 0
    assert kill["recomputed_steps"] == kill["lost_records"]
    assert 0 < result["useful_s"] < result["wall_s"] and 0 < result["goodput"] < 1
    parts = result["useful_s"] + sum(v for k, v in result["split"].items() if k != "other_s")
    assert abs(result["wall_s"] - parts) < 0.02 * result["wall_s"], result["split"]
    assert result["split"]["startup_s"] > 0 and result["split"]["downtime_s"] > 0
