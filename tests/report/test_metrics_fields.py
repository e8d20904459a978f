"""A real run's metrics.jsonl carries every documented field with sane values; TensorBoard too."""

from __future__ import annotations

import json
from pathlib import Path

from launching import GPT_TINY, launch, metrics


def test_metrics_fields_and_tensorboard(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = launch(*GPT_TINY, "trainer.max_steps=6", "trainer.log_every=2", "checkpoint.every_steps=3",
                    f"run_dir={run}")
    assert result.returncode == 0, result.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["loss"] > 0 and r["lr"] > 0 and r["attempt"] == 0
        assert r["samples_per_s"] > 0 and abs(r["tokens_per_s"] - 32 * r["samples_per_s"]) < 1e-6 * r["tokens_per_s"]
        assert r["step_time_s"] > 0 and min(r["data_wait_s"], r["checkpoint_block_s"], r["compute_s"]) >= 0
        split = r["data_wait_s"] + r["checkpoint_block_s"] + r["compute_s"]
        assert abs(split - r["step_time_s"]) < 1e-9
        assert r["mem_peak_bytes"] > 10 * 2**20
        assert r["samples_seen"] == 16 * r["step"]
        assert "mfu" not in r  # no known peak on a CPU
        assert r["grad_norm"] > 0  # the gpt recipe clips
    assert any(r["checkpoint_block_s"] > 0 for r in rows)
    records = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    events = [e["event"] for e in records]
    assert events[0] == "start" and events[-1] == "finish" and events.count("checkpoint") >= 2
    # Every save is reported durable once, at or after the step it was taken.
    taken = [e["step"] for e in records if e["event"] == "checkpoint"]
    durable = [(e["step"], e["at_step"]) for e in records if e["event"] == "checkpoint_committed"]
    assert [s for s, _ in durable] == taken == [3, 6] and all(at >= s for s, at in durable)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
