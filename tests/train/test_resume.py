"""Relaunching the same command resumes: across world sizes, and after SIGTERM with zero loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launching import GPT_TINY, RESNET_TINY, launch, launch_and_sigterm, metrics

# gpt, not resnet: BatchNorm normalises over each rank's micro-batch, so a ResNet's loss
# legitimately depends on the world size. Constant LR: the schedule would otherwise depend
# on each segment's max_steps.
ELASTIC = [*GPT_TINY, "strategy=ddp", "data.batch_size=48", "optim.schedule=constant", "checkpoint.every_steps=4"]


@pytest.mark.rotate("e2e-resume")
def test_resume_on_other_world_sizes_matches_uninterrupted(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert launch(*ELASTIC, "launcher.workers=2", "trainer.max_steps=12", f"run_dir={ref}").returncode == 0
    run = tmp_path / "elastic"
    for workers, stop in ((2, 4), (1, 8), (3, 12)):
        result = launch(*ELASTIC, f"launcher.workers={workers}", f"trainer.max_steps={stop}", f"run_dir={run}")
        assert result.returncode == 0, result.stderr
    a, b = metrics(ref), metrics(run)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["samples_seen"] for r in b] == [48 * s for s in range(1, 13)]
    # Same samples and weights; only the order of float sums differs between world sizes.
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * max(1.0, abs(ra["loss"])), (ra["step"], ra["loss"], rb["loss"])
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "restore"] == [4, 8]
    assert [e["world_size"] for e in events if e["event"] == "start"] == [2, 1, 3]


@pytest.mark.rotate("e2e-resume")
def test_sigterm_exits_75_and_loses_no_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*RESNET_TINY, "strategy=ddp", "launcher.workers=2", "trainer.max_steps=400", "checkpoint.every_steps=1000",
            f"run_dir={run}"]
    stopped = launch_and_sigterm(*args, run_dir=run, after_records=5)
    out = stopped.stdout
    assert stopped.returncode == 75, out
    assert "preemption (signal SIGTERM)" in out and "exiting with code 75" in out
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    (stop,) = [e["step"] for e in events if e["event"] == "preempted"]
    assert stop >= 5 and metrics(run)[-1]["step"] == stop
    resumed = launch(*args[:-3], f"trainer.max_steps={stop + 3}", "checkpoint.every_steps=1000", f"run_dir={run}")
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    (restore,) = [e for e in events if e["event"] == "restore"]
    assert restore["step"] == stop and restore["recomputed_steps"] == 0
    assert [r["step"] for r in metrics(run)] == list(range(1, stop + 4))
