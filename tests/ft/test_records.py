"""metrics.jsonl and events.jsonl of a replicas run, from hand-written ledgers whose right
answer is known: a killed attempt recorded by the next one, which began from the checkpoint."""

from __future__ import annotations

import json

from trainkit import rundir
from trainkit.config import load_config
from trainkit.cost import goodput
from trainkit.ft.records import record_attempt


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _steps(group, first, last, t0, *, stall=0.0):
    """Commits of steps first..last, 0.1 s each (1 ms of it the quorum), rank = group."""
    out = []
    for i, step in enumerate(range(first, last + 1)):
        quorum = 0.001 + (stall if i == 2 else 0.0)
        out.append({"step": step, "group": group, "rank": group, "participants": 2, "chunks": [], "loss": 1.0,
                    "lr": 0.1, "time": t0 + 0.1 * (i + 1) + (stall if i >= 2 else 0.0),
                    "step_s": 0.1 + (stall if i == 2 else 0.0), "quorum_s": quorum, "data_s": 0.01})
    return out


def test_a_crashed_attempt_and_its_resume_account_like_the_restart_mode(tmp_path):
    cfg = load_config({"run_dir": str(tmp_path), "strategy": {"name": "ddp"}, "data": {"batch_size": 8},
                       "trainer": {"max_steps": 20, "log_every": 5}, "ft": {"mode": "replicas"}})
    ledger = [tmp_path / rundir.ft_ledger(g) for g in (0, 1)]
    # Attempt 0: starts at 100, commits steps 0..14 (a 1 s heartbeat wait in step 2), saves
    # step 10, and is killed (nothing recorded it).
    for g in (0, 1):
        _write(ledger[g], [{"event": "start", "group": g, "incarnation": 0, "time": 100.0}])
        _write(ledger[g], _steps(g, 0, 14, 101.0, stall=1.0))
    _write(ledger[0], [{"event": "checkpoint", "group": 0, "step": 10, "blocking_s": 0.05, "time": 103.05}])
    assert record_attempt(cfg, began=None, outcome=None)
    # Attempt 1: its supervisor starts at 200; group 0 restores step 10, both commit 10..19.
    for g in (0, 1):
        _write(ledger[g], [{"event": "start", "group": g, "incarnation": 0, "time": 200.5}])
    _write(ledger[0], [{"event": "healed", "group": 0, "step": 10, "source": "checkpoint", "load_s": 0.2,
                        "time": 201.0}])
    for g in (0, 1):
        resumed = _steps(g, 10, 19, 201.0)
        # The first quorum waited 0.5 s for the other group, before the restore.
        resumed[0].update(step_s=0.6, quorum_s=0.501)
        _write(ledger[g], resumed)
    _write(ledger[0], [{"event": "checkpoint", "group": 0, "step": 20, "blocking_s": 0.05, "time": 202.1}])
    assert record_attempt(cfg, began=200.0, outcome="finished")

    events, metrics = rundir.read_events(str(tmp_path)), rundir.read_metrics(str(tmp_path))
    assert [e["event"] for e in events] == ["start", "checkpoint", "restore", "start", "checkpoint", "finish"]
    assert [r["step"] for r in metrics] == [5, 10, 15, 20]  # attempt 0's 15 dropped, redone by attempt 1
    assert [r["attempt"] for r in metrics] == [0, 0, 1, 1] and all(r["step_time_s"] > 0 for r in metrics)
    # The heartbeat wait is the first record's stall, not useful time.
    assert abs(metrics[0]["ft_stall_s"] * 5 - 1.0) < 1e-6 and metrics[1]["ft_stall_s"] < 1e-9
    g = goodput(metrics, events)
    assert [s["status"] for s in g["spans"]] == ["crashed", "finished"] and g["recomputed_steps"] == 5
    assert g["attempts"] == 2 and g["crashes"] == 1
    # Start-up: attempt 0's first group start to its loop (1 s), attempt 1's supervisor start
    # to its loop less the restore it loaded (1 - 0.2 s).
    assert abs(g["badput_s"]["restore"] - 0.2) < 1e-6 and abs(g["badput_s"]["startup"] - 1.8) < 1e-6
    assert abs(g["useful_s"] - (20 * (0.1 - 0.01))) < 1e-6  # 20 steps at 0.1 s less their data time
    assert abs(g["badput_s"]["membership"] - 1.0) < 1e-6  # the heartbeat wait has its own bucket
    assert g["badput_s"]["other"] >= 0 and abs(sum(g["badput_s"].values()) + g["useful_s"] - g["wall_s"]) < 1e-6
