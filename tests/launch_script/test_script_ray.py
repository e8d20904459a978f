"""script= on launcher=ray (a private Ray on 127.0.0.1): the same script, the same resume rule.

Run to step 60 on Ray, relaunched to 150: it resumes at 60 and its per-step losses equal the
local launcher's uninterrupted run bit for bit (same world size, CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launching import ROOT, launch, metrics

pytest.importorskip("ray")

SCRIPT = ROOT / "docs" / "examples" / "train_script.py"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _args(run_dir: Path, steps: int, *launcher: str) -> list[str]:
    return [f"script={SCRIPT}", *launcher, "launcher.workers=2", "trainer.threads=1", f"run_dir={run_dir}",
            "trainer.log_every=1", "trainer.progress=plain", "--", "--steps", str(steps)]


@pytest.mark.slow  # ~80 s (two private Ray start-ups); test_script_launch.py is the default proof
def test_script_on_ray_relaunch_resumes_like_local(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert launch(*_args(ref, 150, "launcher=local")).returncode == 0
    run = tmp_path / "ray"
    first = launch(*_args(run, 60, "launcher=ray"), env=RAY_ENV, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "ray: 2 workers" in first.stdout
    again = launch(*_args(run, 150, "launcher=ray"), env=RAY_ENV, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from checkpoint at step 60" in again.stdout
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(ref)]
