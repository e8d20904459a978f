"""``python -m trainkit.launch script=...``: a user's own script through the recipe launchers.

A plain argparse script (docs/examples/train_script.py) on 2 local workers, SIGTERMed mid-run:
exit 75; relaunched: the per-step losses equal an uninterrupted run's bit for bit. Its own
arguments (after ``--``) reach it untouched; bad input is one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launching import ROOT, launch, launch_and_sigterm, launch_here, metrics
from trainkit import rundir

SCRIPT = ROOT / "docs" / "examples" / "train_script.py"
HERE = Path(__file__).resolve().parent
STEPS = 400  # after the SIGTERM the run must outlast the agreement's period (0.5 s)


def script_args(run_dir: Path, *extra: str) -> list[str]:
    # --lr=0.05 looks like an override: after -- it is the script's, untouched.
    return [f"script={SCRIPT}", "launcher.workers=2", f"run_dir={run_dir}", "trainer.log_every=1",
            "trainer.progress=plain", *extra, "--", "--steps", str(STEPS), "--lr=0.05"]


@pytest.mark.rotate("e2e-resume")
def test_script_sigterm_exits_75_and_resumes_bitwise(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    result = launch(*script_args(ref))
    assert result.returncode == 0, result.stdout + result.stderr
    reference = [r["loss"] for r in metrics(ref)]
    assert len(reference) == STEPS and reference[-1] < 0.2 * reference[0]

    run = tmp_path / "run"
    stopped = launch_and_sigterm(*script_args(run), run_dir=run, after_records=5)
    out = stopped.stdout
    assert stopped.returncode == 75, out
    (stop,) = [e["step"] for e in rundir.read_events(str(run)) if e["event"] == "preempted"]
    assert 5 <= stop < STEPS, out

    resumed = launch(*script_args(run))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from checkpoint at step {stop}" in resumed.stdout
    assert [r["loss"] for r in metrics(run)] == reference


def test_missing_script_is_one_line(tmp_path: Path) -> None:
    result = launch_here(f"script={tmp_path}/nope.py", "--", "--steps", "3")
    assert result.returncode == 2
    assert result.stderr == f"error: script={tmp_path}/nope.py: no such file\n"


def test_arguments_after_dashes_need_a_script() -> None:
    result = launch_here("recipe=resnet", "--", "--steps", "3")
    assert result.returncode == 2 and "add script=PATH" in result.stderr


def test_script_without_a_run_is_one_line(tmp_path: Path) -> None:
    result = launch(f"script={HERE / 'no_run.py'}", "launcher.workers=2", f"run_dir={tmp_path}", "--", "--x", "1",
                    timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "args: ['--x', '1']" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert "never created a trainkit.Run" in line and line.startswith("error: worker rank"), line


def test_failing_worker_error_is_printed_once(tmp_path: Path) -> None:
    result = launch(f"script={HERE / 'fails_on_rank1.py'}", "launcher.workers=2", f"run_dir={tmp_path}",
                    timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert err.count("Traceback") == 1 and err.count("ValueError: bad batch in my_loader (rank 1)") == 2, err
    # The traceback starts at the script: no worker-entry or runpy frames.
    assert 'fails_on_rank1.py", line 6' in err and "runpy" not in err and "trainkit/launch" not in err, err
    assert err.rstrip().endswith("error: worker rank 1 failed (exit code 1): ValueError: bad batch in my_loader (rank 1)")
