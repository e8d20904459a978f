"""What users type and expect: strategy=auto, Hydra's flags, credentials kept out of the run,
metrics that survive a resume exactly, and the grace period checked."""

from __future__ import annotations

import json

import pytest

from launching import RESNET_TINY, launch, launch_and_sigterm, launch_here, metrics
from trainkit import rundir


def _one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(("workers", "expected"), [(1, "single"), (2, "ddp")])
def test_strategy_auto_follows_the_world_size(workers, expected):
    result = launch_here("recipe=resnet", f"launcher.workers={workers}", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    strategy = result.stdout.split("strategy:", 1)[1]
    assert f"name: {expected}" in strategy.split("launcher:", 1)[0]


def test_auto_with_two_workers_trains(tmp_path):
    result = launch(*RESNET_TINY, "launcher.workers=2", "trainer.max_steps=2", f"run_dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())
    assert summary["strategy"] == "ddp" and summary["world_size"] == 2


def test_hydra_flags():
    job = launch_here("recipe=gpt", "--cfg", "job")
    assert job.returncode == 0 and "task: gpt" in job.stdout and "hydra:" not in job.stdout
    hydra = launch_here("recipe=gpt", "--cfg", "hydra")
    assert hydra.returncode == 0 and hydra.stdout.startswith("hydra:") and "task: gpt" not in hydra.stdout
    both = launch_here("recipe=gpt", "--cfg", "all")
    assert both.returncode == 0 and "task: gpt" in both.stdout and "hydra:" in both.stdout
    helped = launch_here("--help")
    assert helped.returncode == 0, helped.stderr
    assert "strategy: accelerate, auto, ddp, deepspeed, fsdp, single" in helped.stdout
    assert "recipe: gpt, resnet" in helped.stdout and "launcher: local, ray" in helped.stdout
    assert "strategy=deepspeed: backend='auto' zero_stage=2" in helped.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--config-name", "nope"], "--config-name=nope: no such config"),
    (["hydra.run.dir=/tmp/x"], "hydra.run.dir: a run lives in run_dir"),
    (["strategy=ddp", "strategy.zero_stage=3"], "unknown key 'strategy.zero_stage'; valid keys in strategy: name, backend, find_unused_parameters"),
])
def test_hydra_mistakes_are_one_line(tmp_path, args, expected):
    result = launch_here("recipe=resnet", *args, f"run_dir={tmp_path}/run")
    assert result.returncode == 2
    assert expected in _one_line(result)
    assert not (tmp_path / "run").exists()


def test_credentials_never_land_in_the_run(tmp_path):
    key, secret = "AKIAPLANTEDKEY0001", "planted-secret-value-9876"
    creds = [f"storage.s3.key={key}", f"storage.s3.secret={secret}",
             f'storage.az.connection_string="AccountKey={secret}x"']
    shown = launch_here("recipe=resnet", *creds, "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert secret not in shown.stdout and key not in shown.stdout and "<redacted>" in shown.stdout
    assert "credential-like values are shown as <redacted>" in shown.stdout
    run = tmp_path / "run"
    result = launch(*RESNET_TINY, *creds, "trainer.max_steps=2", "trainer.loggers=[tensorboard]", f"run_dir={run}")
    assert result.returncode == 0, result.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == rundir.CONFIG for p in files) and any("attempt-0" in p.name for p in files)
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and key.encode() not in data, path
    assert secret not in result.stdout + result.stderr


@pytest.mark.rotate("e2e-resume")
def test_metrics_survive_a_resume_exactly(tmp_path):
    """A stop between two logging steps: the resumed run's regular records equal an
    uninterrupted run's (the window's sums are in the state tree; the stop record leaves it open)."""
    args = [*[o for o in RESNET_TINY if not o.startswith("trainer.log_every")], "strategy=ddp",
            "launcher.workers=2", "seed=3", "trainer.log_every=25", "checkpoint.every_steps=1000"]
    ref = tmp_path / "ref"
    done = launch(*args, "trainer.max_steps=100", f"run_dir={ref}")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    # At once after the first record: the agreement's lag puts the stop at least a step past it,
    # and far before the next regular record (log_every=25) whatever the machine's speed.
    stopped = launch_and_sigterm(*args, "trainer.max_steps=400", f"run_dir={run}", run_dir=run, after_records=1)
    assert stopped.returncode == 75, stopped.stdout
    (stop,) = [e["step"] for e in rundir.of(rundir.read_events(str(run)), rundir.PREEMPTED)]
    assert stop % 25 and stop < 100, f"the stop should land between logging steps, at {stop}"
    resumed = launch(*args, "trainer.max_steps=100", f"run_dir={run}")
    assert resumed.returncode == 0, resumed.stderr
    regular = {r["step"]: r["loss"] for r in metrics(run) if r["step"] % 25 == 0}
    expected = {r["step"]: r["loss"] for r in metrics(ref)}
    assert regular == expected
    assert stop in {r["step"] for r in metrics(run)}, "the stop-step record stays"


def test_grace_period_is_checked_and_recorded(tmp_path):
    run = tmp_path / "run"
    result = launch(*RESNET_TINY, "trainer.max_steps=4", "checkpoint.every_steps=2",
                    "checkpoint.async_save=false", "preemption.grace_seconds=0.000001", f"run_dir={run}")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert out.count("longer than preemption.grace_seconds=1e-06") == 1, out
    checks = rundir.of(rundir.read_events(str(run)), rundir.GRACE_CHECK)
    assert [c["source"] for c in checks] and all(c["source"] == "save" for c in checks)
    assert all(not c["fits"] and c["grace_s"] == 1e-06 and c["save_s"] > 0 for c in checks)
    again = launch(*RESNET_TINY, "trainer.max_steps=5", "preemption.grace_seconds=100", f"run_dir={run}")
    assert again.returncode == 0, again.stderr
    checks = rundir.of(rundir.read_events(str(run)), rundir.GRACE_CHECK)
    startup = [c for c in checks if c["source"] == "startup"]
    assert len(startup) == 1 and startup[0]["fits"] and startup[0]["grace_s"] == 100
