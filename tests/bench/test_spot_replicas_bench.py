"""``python -m trainkit.bench spot --modes replicas`` end to end on a compressed schedule (slow: ~3 min).

A real loopback Ray cluster, a real ``launcher=ray ft.mode=replicas`` job with two replica
groups, one real drain and one real hard node kill: the drain must be the group's leave (no
try redone), each struck group must come back through Ray's replacement and heal from its
peer, the job must never stop (one attempt, no downtime), and the accounting must add up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainkit.bench.spot import run_bench, summary_lines
from trainkit.bench.spot_schedule import parse_schedule

STORE = str(Path(__file__).resolve().parents[2] / ".cache" / "test-store")
TINY = ["model.width=4", "model.blocks=[1,1]", "model.image_size=8", "data.batch_size=32"]
STEPS = 6000  # long enough that both events and both replacements happen in a running job


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_spot_bench_replicas_drain_and_kill(monkeypatch):
    monkeypatch.setenv("TRAINKIT_STORE", STORE)
    result = run_bench(parse_schedule("drain@20,kill@45"), steps=STEPS, overrides=TINY, grace_s=20,
                       replace_after_s=5, timeout_s=700, mode="replicas", log=lambda _: None)
    text = "\n".join(summary_lines(result))
    assert result["exit_code"] == 0, f"{text}\nlog: {result['launch_log']}"
    assert result["history_problems"] == [] and result["steps"] == STEPS, text
    assert result["not_fired"] == [] and result["attempts"] == 1, text
    drain, kill = result["events"]
    assert (drain["kind"], kill["kind"]) == ("drain", "kill")
    # The notice is seen within a poll and becomes the group's leave: nothing redone.
    assert 0 <= drain["notice_to_leaving_s"] < drain["notice_to_left_s"] < 20, drain
    assert drain["redone_tries"] == 0, drain
    assert kill["notice_to_leaving_s"] is None and kill["to_survivor_short_commit_s"] > 0, kill
    for event in (drain, kill):
        assert event["healed_from"] == "peer", event
        assert 0 < event["to_replacement_start_s"] <= event["to_healed_s"] <= event["to_all_groups_s"], event
        assert event["steps_short"] > 0 and event["cost_s"] >= event["stall_s"] >= 0, event
    ft = result["summary_ft"]
    assert ft["groups_left"] == 1 and ft["groups_lost"] == 1 and ft["healed_from_peer"] == 2, ft
    # Nobody stopped: no downtime, no recompute, no restore; the losses are the membership's.
    split = result["split"]
    assert split["downtime_s"] == split["recompute_s"] == split["restore_s"] == 0, split
    assert split["membership_s"] > 0, split
    assert 0 < result["useful_s"] < result["wall_s"] and 0 < result["goodput"] < 1
    parts = result["useful_s"] + sum(v for k, v in split.items() if k != "other_s")
    assert abs(result["wall_s"] - parts) < 0.02 * result["wall_s"], split
