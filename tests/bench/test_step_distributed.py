"""``python -m trainkit.bench step --workers 2``: both loops run on 2 gloo ranks and the
ratio is printed and recorded (the figure itself lives in docs/benchmarks, not in a test)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from trainkit.bench.step import interleaved


def _sleeper(log: list[str], name: str, step_s: float, steps: int):
    log.append(f"{name} setup")
    yield
    for _ in range(steps):
        time.sleep(step_s)
        log.append(name)
        yield
    log.append(f"{name} end")


def test_blocks_take_turns_and_each_loop_is_timed_alone():
    log: list[str] = []
    ours, plain = interleaved(_sleeper(log, "ours", 0.004, 12), _sleeper(log, "plain", 0.001, 12), blocks=4, block=3,
                              device=torch.device("cpu"))
    assert log[:2] == ["ours setup", "plain setup"] and log[-1] == "ours end"
    turns = [log[i] for i in range(2, 2 + 24, 3)]
    assert turns == ["ours", "plain", "plain", "ours", "ours", "plain", "plain", "ours"]
    assert all(log[i:i + 3] == [log[i]] * 3 for i in range(2, 26, 3))
    assert len(ours) == len(plain) == 4
    assert all(o > 0.012 and 0.003 < q < 0.012 for o, q in zip(ours, plain))


@pytest.mark.rotate("bench-step-2-workers")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_print_and_record_the_ratio(tmp_path, strategy):
    out = tmp_path / "step.md"
    p = subprocess.run([sys.executable, "-m", "trainkit.bench", "step", "--strategy", strategy, "--workers", "2",
                        "--blocks", "3", "--block", "2", "--width", "32", "--depth", "2", "--batch", "8",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    raw = json.loads(next(x for x in p.stdout.splitlines() if x.startswith('{"bench": "step"')))
    assert raw["workers"] == 2 and raw["backend"] == "gloo" and raw["strategy"] == strategy
    assert len(raw["ours"]) == len(raw["plain"]) == 3 + raw["warmup_blocks"] and all(t > 0 for t in raw["ours"] + raw["plain"])
    assert len(raw["ratios"]) == 3 and raw["quartiles"][0] <= raw["ratio"] <= raw["quartiles"][1]
    assert "median over 3 pairs of neighbouring blocks" in p.stdout
    assert f"ratio trainkit/hand-written {'DDP' if strategy == 'ddp' else 'FSDP2'}:" in p.stdout
    text = out.read_text()
    assert text.startswith("# Step overhead") and f"--strategy {strategy} --workers 2" in text and "median step" in text


def test_workers_need_a_distributed_strategy():
    p = subprocess.run([sys.executable, "-m", "trainkit.bench", "step", "--workers", "2"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--workers > 1 needs --strategy ddp or fsdp" in p.stderr
