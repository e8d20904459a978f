"""``python -m trainkit.bench step --workers 2``: both loops run on 2 gloo ranks and the
ratio is printed and recorded (the figure itself lives in docs/benchmarks, not in a test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.rotate("bench-step-2-workers")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_print_and_record_the_ratio(tmp_path, strategy):
    out = tmp_path / "step.md"
    p = subprocess.run([sys.executable, "-m", "trainkit.bench", "step", "--strategy", strategy, "--workers", "2",
                        "--steps", "12", "--rounds", "2", "--width", "32", "--depth", "2", "--batch", "8",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    raw = json.loads(next(x for x in p.stdout.splitlines() if x.startswith('{"bench": "step"')))
    assert raw["workers"] == 2 and raw["backend"] == "gloo" and raw["strategy"] == strategy
    assert len(raw["ours"]) == len(raw["plain"]) == 2 and all(mean > 0 and step > 0 for mean, step in raw["ours"] + raw["plain"])
    assert len(raw["step_ratios"]) == 2 and "median single-step ratio" in p.stdout
    assert f"ratio trainkit/hand-written {'DDP' if strategy == 'ddp' else 'FSDP2'}:" in p.stdout
    text = out.read_text()
    assert text.startswith("# Step overhead") and f"--strategy {strategy} --workers 2" in text and "median step" in text


def test_workers_need_a_distributed_strategy():
    p = subprocess.run([sys.executable, "-m", "trainkit.bench", "step", "--workers", "2"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--workers > 1 needs --strategy ddp or fsdp" in p.stderr
