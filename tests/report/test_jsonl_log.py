"""JsonlLog.keep: what a resume uses to cut metrics.jsonl back to the restored step."""

from __future__ import annotations

import os

from trainkit import rundir
from trainkit.metrics.jsonl import JsonlLog


def test_keep_returns_the_dropped_records_and_keeps_lines_verbatim(tmp_path):
    log = JsonlLog(str(tmp_path), "metrics.jsonl")
    for step in range(1, 8):
        log.write({"step": step, "loss": 1.0 / step})
    with open(log.path, "a", encoding="utf-8") as f:
        f.write("\n")  # a blank line is skipped, not an error
    before = open(log.path, encoding="utf-8").read().splitlines()

    dropped = log.keep(lambda r: r["step"] <= 5)
    assert [r["step"] for r in dropped] == [6, 7]
    assert open(log.path, encoding="utf-8").read().splitlines() == before[:5]
    log.write({"step": 6, "loss": 0.5})  # the log stays appendable after the rewrite
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5, 6]


def test_keep_leaves_the_file_alone_when_nothing_is_dropped(tmp_path):
    log = JsonlLog(str(tmp_path), "metrics.jsonl")
    for step in range(1, 4):
        log.write({"step": step})
    log.flush()
    os.utime(log.path, ns=(10**9, 10**9))  # a rewrite would move the mtime
    assert log.keep(lambda r: r["step"] <= 3) == []
    assert os.stat(log.path).st_mtime_ns == 10**9 and len(log.records()) == 3


def test_a_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    log = JsonlLog(str(tmp_path), rundir.METRICS)
    for step in range(1, 4):
        log.write({"step": step})
    with open(log.path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # the kill landed mid-write
    log.close()
    log = JsonlLog(str(tmp_path), rundir.METRICS)
    assert log.keep(lambda r: r["step"] <= 3) == []
    log.write({"step": 4})
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4]
    assert [r["step"] for r in rundir.read_metrics(str(tmp_path))] == [1, 2, 3, 4]
