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


def test_a_remote_log_rolls_into_parts_and_reads_back_whole(s3_url, monkeypatch, tmp_path):
    """Each upload puts at most a part (not the whole log), readers join the parts and the
    tail, and a resume's cut reaches into the sealed parts when the records past the
    checkpoint were sealed already."""
    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = f"{s3_url}/run"
    log = JsonlLog(run_dir, rundir.METRICS, flush_seconds=0.0, part_bytes=200)
    for step in range(1, 31):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    parts = rundir.list_parts(rundir.path(run_dir, rundir.METRICS))
    assert len(parts) >= 5
    tail = rundir.read_bytes(rundir.path(run_dir, rundir.METRICS))
    assert len(tail) < 200 + 40  # the tail is what came after the last part
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == list(range(1, 31))

    log = JsonlLog(run_dir, rundir.METRICS, flush_seconds=0.0, part_bytes=200)
    assert [r["step"] for r in log.records()] == list(range(1, 31))
    last_part_first_step = rundir.parse_jsonl(rundir.read_bytes(parts[-1]).decode())[0]["step"]
    restored = last_part_first_step - 2  # the checkpoint lies in an earlier part
    dropped = log.keep(lambda r: r["step"] <= restored)
    assert [r["step"] for r in dropped] == list(range(restored + 1, 31))
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == list(range(1, restored + 1))
    log.write({"step": restored + 1})
    log.close()
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == list(range(1, restored + 2))
