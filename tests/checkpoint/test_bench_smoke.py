"""Smoke test of ``python -m trainkit.bench checkpoint``: tiny state, file store, 1 repeat.

Checks that the figures it reports are sane, never how fast anything is.
"""

from __future__ import annotations

import json
import math

from trainkit.bench import checkpoint as bench


def test_save_load_bench_reports_sane_figures(tmp_path, capsys):
    out = tmp_path / "checkpoint-smoke.md"
    assert bench.main(["--store", "file", "--state-gb", "0.02", "--repeats", "1", "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1])
    assert res["bench"] == "checkpoint" and res["mode"] == "save-load"
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["torch"]
    r = res["save_load"]
    assert r["store"] == "file" and r["repeats"] == 1
    assert r["state_bytes"] >= 0.02e9
    assert r["dcp_data_files"] >= 1
    for name, runs in r["runs"].items():
        assert len(runs) == 1 and (runs[0] > 0 or name == "train_staged_wait_s"), name
    s = r["summary"]
    assert 0 < s["blocking_s"] <= s["blocking_total_s"]
    assert 0 < s["blocking_ratio"] <= 1
    assert r["median"]["train_steps_during_save"] >= 1 and r["first_save"]["total_s"] > 0
    for k, v in s.items():
        if k.endswith("_mb_s"):
            assert math.isfinite(v) and v > 0, k
    assert s["save_vs_raw"] > 0 and s["load_vs_raw"] > 0
    text = out.read_text()
    assert "in training: loop blocked" in text and "git commit" in text and "--state-gb 0.02" in text


def test_kill_resume_table_formats():
    ev = {"signal": "SIGKILL", "step_seen": 12, "last_logged_step": 13, "exit_code": -9, "restored_step": 10,
          "steps_lost": 3, "kill_to_first_step_s": 20.5, "kill_to_exit_s": 0.1, "relaunch_to_restore_s": 15.0,
          "relaunch_to_first_step_s": 20.4}
    evs = [ev, {**ev, "signal": "SIGTERM", "exit_code": 75, "restored_step": 13, "steps_lost": 0}]
    res = {"events": evs}
    for kind in ("SIGKILL", "SIGTERM"):
        e = [x for x in evs if x["signal"] == kind]
        res[kind] = {"n": 1, "median_kill_to_first_step_s": e[0]["kill_to_first_step_s"],
                     "median_steps_lost": e[0]["steps_lost"], "max_steps_lost": e[0]["steps_lost"],
                     "median_kill_to_exit_s": 0.1, "median_relaunch_to_restore_s": 15.0,
                     "exit_codes": [e[0]["exit_code"]]}
    table = bench.kill_resume_table(res)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    assert ["2", "SIGTERM", "12", "13", "75", "13", "0", "20.50"] in rows
    assert ["SIGKILL", "20.50", "0.10", "15.00", "3 / 3", "[-9]"] in rows
