"""``scripts/gpu-check.sh``: skips with one line and exit 0 without a GPU (what CI runs), and
its report, written by a CPU dry run, has every section with the figures parsed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def test_skips_without_a_gpu():
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no nvidia-smi on it
    p = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "gpu-check: skipped: no NVIDIA GPU on this machine"


def _sections() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SECTIONS


@pytest.mark.slow  # 1.5-3.5 min of tiny CPU runs; the skip line above is what CI sees
def test_dry_run_writes_every_section(tmp_path):

    p = subprocess.run([str(SCRIPT), "--dry-run", "--out-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, cwd=str(REPO))
    assert p.returncode == 0, p.stdout + p.stderr
    (report,) = tmp_path.glob("gpu-check-*.md")
    text = report.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == list(_sections())
    assert "- git commit: `" in text and "torch " in text
    # CPU-capable runs produced figures; the GPU-only ones say why they did not run.
    table = text.split("## Throughput (bf16)")[1].split("##")[0]
    gpt = next(line for line in table.splitlines() if line.startswith("| gpt single compile=off"))
    assert re.search(r"\|\s+\d+\.\d\s+\|\s+\d+\s+\|", gpt) and gpt.rstrip("| ").endswith("ok")
    assert "not run: dry run" in table and "| gpt fsdp compile=off" in table
    ckpt = text.split("## Checkpoint from GPU memory")[1].split("##")[0]
    assert re.search(r"\|\s+3 \|", ckpt)  # the saves at steps 2 and 4, and the final one
    assert "skipped (no CUDA)" in text.split("## Sync-debug test")[1].split("##")[0]
    overhead = text.split("## Step overhead vs a hand-written loop")[1].split("##")[0]
    assert re.search(r"\| ddp .*\| cpu / gloo .*\| \d+\.\d{4} \| \d\.\d{3}-\d+\.\d{3} \| ok", overhead)
    assert re.search(r"\| fsdp .*\| \d+\.\d{4} \| \d\.\d{3}-\d+\.\d{3} \| ok", overhead)
    assert "(dry run)" in text.split("## Goals")[1].split("##")[0]
    commands = text.split("## Commands")[1].split("## Raw")[0]
    assert commands.count("-m trainkit.launch recipe=") == 4 and "-m trainkit.bench step --strategy fsdp" in commands
