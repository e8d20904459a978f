"""goodput() on hand-built logs whose answer is known, and on simulated runs."""

from __future__ import annotations

import math

import pytest

from trainkit.report import goodput, load_run
from trainkit.report.simulate import simulate_run

T = 1000.0


def rec(step, t, attempt, step_time=1.0, **extra):
    return {"step": step, "time": T + t, "attempt": attempt, "step_time_s": step_time, "loss": 1.0 / step,
            "samples_per_s": 32 / step_time, **extra}


def ev(kind, t, **fields):
    return {"event": kind, "time": T + t, **fields}


def test_crash_after_checkpoint():
    # attempt 0: steps 1..35 at 1 s/step, checkpoint at 20, record 30 logged, SIGKILL at ~35.
    # The lead drops record 30 on resume (recomputed_steps=1); attempt 1 redoes 21..40.
    metrics = [rec(10, 10, 0), rec(20, 20, 0), rec(30, 60, 1), rec(40, 70, 1)]
    events = [
        ev("start", 0, attempt=0, step=0, world_size=1, strategy="ddp"),
        ev("checkpoint", 20.5, step=20, blocking_s=0.5),
        ev("restore", 48, step=20, recomputed_steps=1),
        ev("start", 50, attempt=1, step=20, world_size=1, strategy="ddp"),
        ev("checkpoint", 70.5, step=40, blocking_s=0.5),
        ev("finish", 71, step=40),
    ]
    g = goodput(metrics, events)
    assert g["useful_s"] == pytest.approx(40.0)
    assert g["wall_s"] == pytest.approx(71.0)
    assert g["goodput"] == pytest.approx(40.0 / 71.0)
    assert (g["attempts"], g["crashes"], g["preemptions"]) == (2, 1, 0)
    assert (g["recomputed_steps"], g["checkpoints"], g["steps"]) == (1, 2, 40)
    assert g["finished"] is True
    assert g["checkpoint_blocking_s"] == pytest.approx(1.0)
    crashed, finished = g["spans"]
    assert crashed["status"] == "crashed" and crashed["end"] == T + 20.5  # last sign of life
    assert crashed["end_step"] == 20
    assert finished["status"] == "finished" and finished["start_step"] == 20 and finished["end"] == T + 71


def test_preempted_between_records_counts_each_step_once():
    # log_every=10, preempted at step 15 (emergency checkpoint), attempt 1 resumes from 15:
    # its first record (step 20) covers 5 steps, not the 10 since the previous record.
    metrics = [rec(10, 10, 0, 1.0), rec(20, 40, 1, 2.0), rec(30, 50, 1, 1.0)]
    events = [
        ev("start", 0, attempt=0, step=0),
        ev("checkpoint", 16, step=15, blocking_s=1.0),
        ev("preempted", 16, step=15, reason="SIGTERM"),
        ev("restore", 29, step=15, recomputed_steps=0),
        ev("start", 30, attempt=1, step=15),
        ev("finish", 51, step=30),
    ]
    g = goodput(metrics, events)
    assert g["useful_s"] == pytest.approx(10 * 1.0 + 5 * 2.0 + 10 * 1.0)
    assert g["wall_s"] == pytest.approx(51.0)
    assert (g["attempts"], g["crashes"], g["preemptions"], g["recomputed_steps"]) == (2, 0, 1, 0)
    assert [s["status"] for s in g["spans"]] == ["preempted", "finished"]
    assert g["spans"][0]["end"] == T + 16


def test_attempt_killed_before_its_first_record():
    # attempt 1 dies during start-up; attempt 2 restores the same checkpoint.
    metrics = [rec(10, 10, 0), rec(20, 80, 2)]
    events = [
        ev("start", 0, attempt=0, step=0),
        ev("checkpoint", 10.5, step=10, blocking_s=0.5),
        ev("restore", 30, step=10, recomputed_steps=0),
        ev("start", 31, attempt=1, step=10),
        ev("restore", 60, step=10, recomputed_steps=0),
        ev("start", 70, attempt=2, step=10),
        ev("finish", 80, step=20),
    ]
    g = goodput(metrics, events)
    assert (g["attempts"], g["crashes"]) == (3, 2)
    assert g["useful_s"] == pytest.approx(20.0)
    assert g["wall_s"] == pytest.approx(80.0)
    assert g["spans"][1]["end"] == T + 31 and g["spans"][1]["end_step"] == 10


def test_running_run_is_incomplete_not_crashed():
    metrics = [rec(10, 10, 0), rec(20, 20, 0)]
    events = [ev("start", 0, attempt=0, step=0), ev("checkpoint", 20.2, step=20, blocking_s=0.2)]
    g = goodput(metrics, events)
    assert g["crashes"] == 0 and g["finished"] is False
    assert g["spans"][0]["status"] == "incomplete"
    assert g["wall_s"] == pytest.approx(20.2)
    assert g["goodput"] == pytest.approx(20.0 / 20.2)


def test_duplicate_steps_keep_the_last_record():
    # A log that was never rewritten: step 20 logged by attempt 0, then again by attempt 1.
    metrics = [rec(10, 10, 0), rec(20, 20, 0, 5.0), rec(20, 60, 1, 1.0)]
    events = [ev("start", 0, attempt=0, step=0), ev("start", 50, attempt=1, step=10), ev("finish", 61, step=20)]
    g = goodput(metrics, events)
    assert g["useful_s"] == pytest.approx(10 + 10)


def test_without_events_falls_back_to_metrics():
    g = goodput([rec(10, 10, 0), rec(20, 20, 0)], [])
    assert g["attempts"] == 1 and g["useful_s"] == pytest.approx(20.0)
    assert g["wall_s"] == pytest.approx(20.0)  # the first record covers 10 steps of 1 s
    assert goodput([], [])["goodput"] is None


SCENARIOS = {
    "clean": [],
    "crash": [(70, "crash")],
    "preempt": [(100, "preempt")],
    "preempt_unaligned_checkpoint": [(60, "preempt"), (130, "crash")],
    "many": [(30, "crash"), (40, "crash"), (90, "preempt"), (160, "crash")],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_simulated_runs_match_ground_truth(tmp_path, name):
    truth = simulate_run(str(tmp_path / name), max_steps=200, log_every=10, checkpoint_every=50,
                         interruptions=SCENARIOS[name], seed=len(name))
    log = load_run(str(tmp_path / name))
    g = goodput(log.metrics, log.events)
    assert truth["unlogged_steps"] == 0
    assert g["useful_s"] == pytest.approx(truth["useful_s"], rel=1e-9)
    assert g["wall_s"] == pytest.approx(truth["wall_s"], rel=1e-12)
    for key in ("attempts", "crashes", "preemptions", "checkpoints", "recomputed_steps"):
        assert g[key] == truth[key], key
    assert g["finished"] and g["steps"] == 200
    assert 0 < g["goodput"] < 1
    # Every bucket as the simulator's clock spent it; with the useful time they are the wall time.
    assert g["badput_s"] == pytest.approx(truth["badput_s"], abs=1e-6)
    assert g["interruption_s"] == pytest.approx(truth["interruption_s"], abs=1e-6)
    assert g["useful_s"] + sum(g["badput_s"].values()) == pytest.approx(g["wall_s"], rel=1e-12)


def test_unlogged_steps_before_a_preemption_are_overhead(tmp_path):
    # Preempted at step 25 with log_every=10: steps 21..25 ran once but no record covers them.
    truth = simulate_run(str(tmp_path / "r"), max_steps=60, log_every=10, checkpoint_every=100,
                         interruptions=[(25, "preempt")])
    log = load_run(str(tmp_path / "r"))
    g = goodput(log.metrics, log.events)
    assert truth["unlogged_steps"] == 5
    assert g["useful_s"] == pytest.approx(truth["useful_s"], rel=1e-9)
    assert [s["status"] for s in g["spans"]] == ["preempted", "finished"]


def test_memory_url_run_dir():
    url = "memory://trainkit-report-tests/sim"
    truth = simulate_run(url, max_steps=100, interruptions=[(60, "crash")])
    log = load_run(url)
    assert log.name == "sim"
    g = goodput(log.metrics, log.events)
    assert g["useful_s"] == pytest.approx(truth["useful_s"]) and g["crashes"] == 1
    assert math.isclose(g["wall_s"], truth["wall_s"])
