"""``python -m trainkit.report`` as a user runs it, on simulated run dirs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from trainkit import storage
from trainkit.report.__main__ import main
from trainkit.report.plots import PIXELS
from trainkit.report.simulate import simulate_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = ("loss.png", "throughput.png", "step_time.png", "timeline.png", "badput.png")
PRICE = "cost:\n  spot: true\n  spot_usd_per_hour: 1.2\n  on_demand_usd_per_hour: 4.0\n"


def priced(run_dir: str) -> None:
    """Gives a simulated run the price its config.yaml would name."""
    with open(os.path.join(run_dir, "config.yaml"), "a") as f:
        f.write(PRICE)


def cli(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainkit.report", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def check_png(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == PIXELS == (800, 450), path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (450, 800)
    rgb = pixels[..., :3].reshape(-1, 3)
    colours = np.unique((rgb * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20, f"{path} is (nearly) one colour"
    # Something besides white background and black axes: the data was drawn.
    assert (np.ptp(rgb, axis=1) > 0.2).mean() > 0.001, f"{path} has no coloured marks"


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "interrupted")
    truth = simulate_run(run_dir, max_steps=300, log_every=10, checkpoint_every=50,
                         interruptions=[(80, "crash"), (170, "preempt")])
    priced(run_dir)
    return run_dir, truth


def test_single_run_report(interrupted_run):
    run_dir, truth = interrupted_run
    proc = cli(run_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for label in ("steps", "attempts", "preemptions", "crashes", "checkpoints", "recomputed steps",
                  "wall time", "useful step time", "goodput", "final loss", "mean samples/s"):
        assert label in out, label
    goodput_line = next(line for line in out.splitlines() if line.startswith("goodput"))
    assert f"{truth['useful_s'] / truth['wall_s']:.1%}" in goodput_line
    assert "300 (finished)" in out
    for label in ("start-up", "checkpoint restore", "checkpoint save (blocking)", "data wait",
                  "recomputed after a failure", "emergency save", "downtime (waiting for capacity)", "other"):
        assert f"  {label} " in out, label
    wall = truth["wall_s"]
    usd = wall * 1.2 / 3600  # one node, on spot
    assert f"${usd:.4f} (spot, $1.2000/h per node" in out
    rows = [line.split() for line in out.splitlines()]
    lost = truth["interruption_s"] * 1.2 / 3600
    assert ["lost", "to", "interruptions", f"${lost:.4f}"] in rows
    saving = (wall - truth["interruption_s"]) * 4.0 / 3600 - usd
    assert ["saving", "vs", "on-demand", f"${saving:.4f}"] == next(r[:4] for r in rows if r[:1] == ["saving"])
    report = os.path.join(run_dir, "report")
    for name in FIGURES:
        check_png(os.path.join(report, name))
    data = json.load(open(os.path.join(report, "report.json")))
    assert data["attempts"] == 3 and data["crashes"] == 1 and data["preemptions"] == 1
    assert data["cost_usd"] == pytest.approx(usd) and data["badput_s"] == pytest.approx(truth["badput_s"])


def test_sweep_comparison(tmp_path):
    runs = []
    for lr in ("lr1e-3", "lr3e-3", "lr1e-2"):
        runs.append(str(tmp_path / lr))
        simulate_run(runs[-1], max_steps=100, seed=len(runs))
        priced(runs[-1])
    out = str(tmp_path / "cmp")
    proc = cli(*runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "final", "loss", "steps", "goodput", "cost_usd"]
    for lr in ("lr1e-3", "lr3e-3", "lr1e-2"):
        assert any(line.startswith(lr) and " 100 " in line and line.rstrip().endswith(tuple("0123456789"))
                   and " $0.0" in line for line in lines), lr
    check_png(os.path.join(out, "loss.png"))
    assert len(json.load(open(os.path.join(out, "report.json")))) == 3


# The rest call the CLI's main() in-process: a subprocess costs seconds of imports each.


def test_file_url_with_explicit_out(tmp_path, interrupted_run, capsys):
    run_dir, _ = interrupted_run
    assert main(["file://" + run_dir, "--out", str(tmp_path / "explicit")]) == 0
    assert "goodput" in capsys.readouterr().out
    check_png(str(tmp_path / "explicit" / "timeline.png"))


def test_remote_run_dir_reports_into_cwd(tmp_path, s3_url, s3_server, monkeypatch, capsys):
    run_dir = s3_url + "/runs/gpt1"
    storage.configure({"s3": s3_server.storage_options})
    monkeypatch.chdir(tmp_path)
    try:
        truth = simulate_run(run_dir, max_steps=60, interruptions=[(30, "crash")])
        assert main([run_dir]) == 0
    finally:
        storage.configure({})
    assert f"{truth['useful_s'] / truth['wall_s']:.1%}" in capsys.readouterr().out
    for name in FIGURES:
        check_png(str(tmp_path / "report-gpt1" / name))


def test_memory_url_out(tmp_path, interrupted_run):
    run_dir, _ = interrupted_run
    assert main([run_dir, "--out", "memory://trainkit-report-out/r1"]) == 0
    fs, path = storage.filesystem("memory://trainkit-report-out/r1")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == sorted([*FIGURES, "report.json"])
    png = tmp_path / "t.png"
    png.write_bytes(fs.cat_file(path + "/timeline.png"))
    check_png(str(png))


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl or events.jsonl" in capsys.readouterr().err
