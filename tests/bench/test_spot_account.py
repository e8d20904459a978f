"""The spot bench's accounting and schedule on hand-made records whose answer is known."""

from __future__ import annotations

import pytest

from trainkit.bench.spot_account import account, history_problems
from trainkit.bench.spot_schedule import SpotEvent, format_schedule, make_schedule, parse_schedule

T0 = 1000.0


def _rec(step: int, t: float, attempt: int, block: float = 0.0) -> dict:
    return {"step": step, "time": T0 + t, "attempt": attempt, "step_time_s": 1.0, "checkpoint_block_s": block}


def _ev(kind: str, t: float, **fields) -> dict:
    return {"event": kind, "time": T0 + t, **fields}


@pytest.fixture
def scenario():
    """Start-up 10 s; 1 s steps. Attempt 0 checkpoints step 8, runs to step 10 and its node is
    killed at 20.5 s; attempt 1 restores step 8 at 30 s (dropping the records of steps 9 and
    10), is drained at 36.2 s and stops at step 14 (save done at 36.5 s); attempt 2 is made at
    43 s, restores step 14 in 1 s by 45 s and finishes step 20; the launcher exits at 53 s."""
    a0 = [_rec(s, 10 + s, 0, block=0.2 if s == 5 else 0.0) for s in range(1, 11)]
    a1 = [_rec(s, 22 + s, 1) for s in range(9, 15)]
    a2 = [_rec(s, 31 + s, 2) for s in range(15, 21)]
    final = a0[:8] + a1 + a2
    seen = a0 + a1 + a2
    events = [
        _ev("start", 10, attempt=0, step=0), _ev("checkpoint", 18, step=8),
        _ev("restore", 30, step=8, recomputed_steps=2, dropped_until=T0 + 20), _ev("start", 30, attempt=1, step=8),
        _ev("checkpoint", 36.5, step=14, blocking=True), _ev("preempted", 36.5, step=14, reason="drain"),
        _ev("restore", 45, step=14, recomputed_steps=0, load_s=1.0),
        _ev("start", 45, attempt=2, step=14, startup_s=2.0),
        _ev("finish", 51.5, step=20),
    ]
    fired = [{"kind": "kill", "planned_s": 20, "fired_at": T0 + 20.5},
             {"kind": "drain", "planned_s": 36, "fired_at": T0 + 36.2}]
    return final, seen, events, fired


def test_goodput_and_split_add_up_to_the_wall_time(scenario):
    final, seen, events, fired = scenario
    r = account(final, seen, events, fired, T0, T0 + 53)
    assert r["wall_s"] == 53 and r["steps"] == 20 and r["attempts"] == 3
    assert r["useful_s"] == pytest.approx(19.8)  # 20 kept steps less 0.2 s blocked on a save
    assert r["goodput"] == pytest.approx(19.8 / 53)
    assert r["steady_goodput"] == pytest.approx(20 / 53)
    assert r["steady_goodput_training"] == pytest.approx(20 / (53 - 10 - 1.5))  # launch start-up and exit out
    # The run report's buckets; the launcher's own start-up (10 s) added, and its exit (1.5 s).
    assert r["split"] == pytest.approx({
        "startup_s": 10 + 1, "restore_s": 1, "checkpoint_save_s": 0.2, "data_wait_s": 0, "recompute_s": 2,
        "emergency_save_s": 0.5, "downtime_s": 10 + 6.5, "membership_s": 0, "other_s": 0.5, "exit_s": 1.5,
    })
    assert r["useful_s"] + sum(r["split"].values()) == pytest.approx(r["wall_s"])
    assert r["interruption_s"] == pytest.approx(2 + 10 + 0.5 + 6.5 + 2)
    assert r["unscheduled_restarts"] == 0 and r["fired"] == 2


def test_one_row_per_event(scenario):
    final, seen, events, fired = scenario
    kill, drain = account(final, seen, events, fired, T0, T0 + 53)["events"]
    assert kill["kind"] == "kill" and kill["attempt"] == 0
    assert kill["fired_s"] == pytest.approx(20.5)
    assert kill["notice_to_stop_s"] is None
    assert kill["to_first_step_s"] == pytest.approx(31 - 20.5)
    assert (kill["recomputed_steps"], kill["lost_records"], kill["restored_step"]) == (2, 2, 8)
    # Seen at its last record (20 s): the half second to the kill is downtime.
    assert kill["recompute_s"] == pytest.approx(2) and kill["downtime_s"] == pytest.approx(10)
    assert kill["restart_s"] == pytest.approx(10) and kill["cost_s"] == pytest.approx(12)
    assert drain["kind"] == "drain" and drain["attempt"] == 1
    assert drain["notice_to_stop_s"] == pytest.approx(0.3)
    assert drain["to_first_step_s"] == pytest.approx(46 - 36.2)
    assert (drain["recomputed_steps"], drain["lost_records"]) == (0, 0)
    assert drain["emergency_save_s"] == pytest.approx(0.5) and drain["downtime_s"] == pytest.approx(6.5)
    assert (drain["startup_s"], drain["restore_s"]) == pytest.approx((1, 1))
    assert drain["restart_s"] == pytest.approx(8.5) and drain["cost_s"] == pytest.approx(9)


def test_a_restart_without_a_scheduled_event_is_reported(scenario):
    final, seen, events, fired = scenario
    r = account(final, seen, events, fired[1:], T0, T0 + 53)
    assert r["unscheduled_restarts"] == 1 and [e["kind"] for e in r["events"]] == ["drain"]
    # The split is the run's own: it does not depend on what the bench fired.
    assert r["split"] == pytest.approx(account(final, seen, events, fired, T0, T0 + 53)["split"])


def test_history_problems():
    assert history_problems([{"step": s} for s in range(1, 6)], 5) == []
    problems = history_problems([{"step": s} for s in (1, 2, 2, 4)], 5)
    assert problems == ["steps logged more than once: [2]", "2 steps missing, first [3, 5]"]


def test_schedule_is_seeded_spaced_and_inside_the_run():
    a = make_schedule(720, drain_every_s=180, kill_every_s=420, seed=3)
    assert a == make_schedule(720, drain_every_s=180, kill_every_s=420, seed=3)
    assert a != make_schedule(720, drain_every_s=180, kill_every_s=420, seed=4)
    kinds = [e.kind for e in a]
    assert kinds.count("drain") >= 2 and kinds.count("kill") == 1
    times = [e.at_s for e in a]
    assert times == sorted(times) and 60 <= times[0] and times[-1] <= 720 - 60
    assert all(b - a >= 45 for a, b in zip(times, times[1:]))
    assert all(e.victim in (0, 1) for e in a)
    assert [e.kind for e in make_schedule(720, drain_every_s=0, kill_every_s=200)] == ["kill"] * 3


def test_parse_schedule():
    assert parse_schedule("kill@150:1, drain@60") == [SpotEvent("drain", 60), SpotEvent("kill", 150, 1)]
    with pytest.raises(ValueError, match="bad schedule item 'nap@3'"):
        parse_schedule("nap@3")
    assert "60.0  drain" in format_schedule(parse_schedule("drain@60"))


def test_metrics_tail_keeps_records_a_restore_drops(tmp_path):
    import json

    from trainkit.bench.spot import MetricsTail

    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    tail.poll()  # no file yet
    lines = [json.dumps({"step": s, "attempt": 0, "time": s}) + "\n" for s in range(1, 11)]
    path.write_text("".join(lines[:6]) + lines[6][:5])  # a line still being written
    tail.poll()
    assert sorted(k[1] for k in tail.records) == [1, 2, 3, 4, 5, 6] and tail.latest_attempt == 0
    path.write_text("".join(lines))
    tail.poll()
    # The next attempt restores step 4: the file is rewritten shorter, then appended to.
    resumed = [json.dumps({"step": s, "attempt": 1, "time": 20 + s}) + "\n" for s in range(5, 12)]
    path.write_text("".join(lines[:4] + resumed))
    tail.poll()
    assert len(tail.records) == 10 + 7 and tail.latest_attempt == 1
    tail.stop()
    assert len(tail.records) == 17


def test_markdown_section_names_both_commits_and_has_the_tables(scenario):
    from trainkit.bench import report
    from trainkit.bench.spot import PACKAGES, markdown

    final, seen, events, fired = scenario
    result = account(final, seen, events, fired, T0, T0 + 53)
    result.update(mode="restart", exit_code=0, history_problems=[], not_fired=[], run_dir="r", launch_log="l")
    info = {**report.machine(PACKAGES), "git_commit": "abc"}
    text = markdown([result], "python -m trainkit.bench spot --minutes 1", info, [0.5, 0.4, 0.3], "def")
    assert "abc at start, def at end" in text and "ray " in text and "at end: [0.5, 0.4, 0.3]" in text
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in text.splitlines() if line.startswith("|"))}
    assert rows["downtime (waiting for capacity)"] == ["16.5", "31.1%"]
    # emergency save, downtime, start-up, restore, cost
    assert rows["kill (planned 20 s)"][-5:] == ["0.0", "10.0", "0.0", "0.0", "12.0"]
    assert "restore s" in rows["event"] and "steady-state goodput" in text
    assert '"run_dir"' not in text


def test_metrics_tail_opens_the_gate_once_a_newer_attempt_logs(tmp_path):
    import json

    from trainkit.bench.spot import MetricsTail

    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert not tail.training_again()
    path.write_text(json.dumps({"step": 1, "attempt": 0, "time": 1}) + "\n")
    tail.poll()
    assert tail.training_again() and tail.mark(123, 2.0) and not tail.training_again()
    with open(path, "a") as f:
        f.write(json.dumps({"step": 2, "attempt": 1, "time": 3}) + "\n")
    tail.poll()
    assert tail.training_again()


def _ledgers():
    """Group 1 (pid 200) drained at 4.5 s: it marks itself leaving at step 4, trains the window
    steps 5 and 6 with group 0, leaves at 7.1 s; group 0 trains steps 7-9 alone (the first at 8 s,
    step 7 tried twice); the replacement (pid 300) starts at 9 s, heals from group 0 at 10.5 s and
    both commit step 10 at 11 s."""
    def commit(g, step, t, n, **kw):
        return {"step": step, "group": g, "rank": g if n == 2 else 0, "participants": n, "loss": 1.0, "time": t, **kw}

    g0 = [{"event": "start", "group": 0, "pid": 100, "time": 0.0}]
    g1 = [{"event": "start", "group": 1, "pid": 200, "time": 0.0}]
    for step in range(7):
        window = {"window": True} if step in (5, 6) else {}
        g0.append(commit(0, step, step + 1.0, 2, **window))
        g1.append(commit(1, step, step + 1.0, 2, **window))
        if step == 4:
            g1.append({"event": "leaving", "group": 1, "step": 4, "time": 5.0})
    g1.append({"event": "left", "group": 1, "step": 7, "time": 7.1})
    g0.append({"step": 7, "group": 0, "redo": True, "participants": 1, "time": 7.5})
    g0 += [commit(0, step, step + 1.0, 1) for step in (7, 8, 9)]
    g1 += [{"event": "start", "group": 1, "pid": 300, "time": 9.0},
           {"event": "healed", "group": 1, "step": 10, "source": "peer", "time": 10.5}]
    g0.append(commit(0, 10, 11.0, 2))
    g1.append(commit(1, 10, 11.0, 2))
    return {0: g0, 1: g1}


def test_replica_event_rows_from_the_ledgers():
    from trainkit.bench.spot_replicas import event_rows

    # metrics.jsonl as records.py writes it: one record a step (log_every=1), 0.1 s a step with
    # both groups, 0.2 s alone; step 8's record (step 7 done) holds the stall of the redone try.
    final = [{"step": s + 1, "time": s + 1.0, "step_time_s": 0.2 if 7 <= s <= 9 else 0.1,
              "ft_stall_s": 0.4 if s == 7 else 0.0, "ft_groups": 1.0 if 7 <= s <= 9 else 2.0} for s in range(11)]
    fired = [{"kind": "drain", "planned_s": 4, "fired_at": 4.5, "pid": 200},
             {"kind": "kill", "planned_s": 12, "fired_at": 12.0, "pid": 999}]
    drain, unknown = event_rows(_ledgers(), final, fired, t_launch=0.0, median_step_s=0.1)
    assert drain["group"] == 1 and drain["fired_s"] == 4.5
    assert drain["notice_to_leaving_s"] == pytest.approx(0.5) and drain["notice_to_left_s"] == pytest.approx(2.6)
    assert drain["to_survivor_short_commit_s"] == pytest.approx(3.5) and drain["redone_tries"] == 1
    assert drain["to_replacement_start_s"] == pytest.approx(4.5) and drain["to_healed_s"] == pytest.approx(6.0)
    assert drain["healed_from"] == "peer" and drain["to_all_groups_s"] == pytest.approx(6.5)
    assert drain["steps_short"] == 3 and drain["stall_s"] == pytest.approx(0.4)
    assert drain["short_capacity_s"] == pytest.approx(0.3) and drain["cost_s"] == pytest.approx(0.7)
    assert unknown == {"kind": "kill", "planned_s": 12, "fired_s": 12.0, "group": None}


def test_ledger_tail_knows_the_groups_and_waits_for_the_struck_one(tmp_path):
    import json

    from trainkit import rundir
    from trainkit.bench.spot_replicas import LedgerTail

    ledgers = _ledgers()
    tail = LedgerTail(tmp_path)

    def upto(t):
        for g, records in ledgers.items():
            path = tmp_path / rundir.ft_ledger(g)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records if r["time"] <= t))
        tail.poll()

    assert not tail.training_again()
    upto(4.0)
    assert tail.group_of_pid == {100: 0, 200: 1} and tail.training_again()
    assert not tail.mark(999, 4.5) and tail.mark(200, 4.5)
    upto(10.5)  # window steps and the replacement's start: not yet training together again
    assert tail.group_of_pid[300] == 1 and not tail.training_again()
    upto(11.0)
    assert tail.training_again()
