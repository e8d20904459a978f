"""checkpoint.load_from through the launcher: warm starts across strategies and world sizes,
the run's own checkpoint winning over load_from, and the resume config check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launching import GPT_TINY, launch, launch_and_sigterm, launch_here, metrics

# 96 training windows of 33 bytes: two steps of 48 per epoch, unshuffled, so every even step
# starts an epoch on the same batch and a warm-started run's step 1 sees the batch the source
# run's next step saw. Constant LR: the schedule is not part of a warm start.
SMALL = [*GPT_TINY, "model.corpus_bytes=3366", "data.shuffle=false", "data.batch_size=48",
         "optim.schedule=constant"]


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a))


def _one_error_line(stderr: str, needle: str) -> str:
    lines = [line for line in stderr.splitlines() if needle in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.rotate("e2e-long")
def test_ddp_on_2_warm_starts_fsdp_on_3_and_a_file_then_resumes_its_own(tmp_path: Path) -> None:
    src = tmp_path / "src"
    r = launch(*SMALL, "strategy=ddp", "launcher.workers=2", "trainer.max_steps=8", "checkpoint.every_steps=4",
               "checkpoint.export_every_steps=4", f"run_dir={src}")
    assert r.returncode == 0, r.stderr
    weights = src / "exports" / "step_000000004" / "model.safetensors"
    nxt = {m["step"]: m["loss"] for m in metrics(src)}

    # Model and optimizer from step 4 onto fsdp@3: its steps 1..4 are the source's 5..8. It
    # stops at 2 (a preemption's relaunch in miniature) and resumes from its own step 2.
    warm = tmp_path / "warm"
    common = [*SMALL, "strategy=fsdp", "launcher.workers=3", f"checkpoint.load_from={src}@4",
              "checkpoint.load_optimizer=true", f"run_dir={warm}"]
    r = launch(*common, "trainer.max_steps=2")
    assert r.returncode == 0, r.stderr
    assert f"from {src}/checkpoints/step_000000004" in r.stdout, r.stdout
    r = launch(*common, "trainer.max_steps=4")
    assert r.returncode == 0, r.stderr
    assert "warm start" not in r.stdout and "resumed from checkpoint at step 2" in r.stdout, r.stdout
    events = _events(warm)
    assert [e["source"] for e in events if e["event"] == "warm_start"] == [f"{src}@4"]
    assert [e["step"] for e in events if e["event"] == "restore"] == [2]
    got = metrics(warm)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for m in got:
        assert _close(m["loss"], nxt[m["step"] + 4]), (m["step"], m["loss"], nxt[m["step"] + 4])

    # Weights only, from the exported file, on one process: step 1 is the source's step 5.
    single = tmp_path / "single"
    r = launch(*SMALL, "strategy=single", "trainer.max_steps=1", f"checkpoint.load_from={weights}",
               f"run_dir={single}")
    assert r.returncode == 0, r.stderr
    (m,) = metrics(single)
    assert _close(m["loss"], nxt[5]), (m["loss"], nxt[5])
    # The same file streamed into a model built on meta and sharded by fsdp on 2.
    meta = tmp_path / "meta"
    r = launch(*SMALL, "strategy=fsdp", "launcher.workers=2", "trainer.meta_init=true", "trainer.max_steps=1",
               f"checkpoint.load_from={weights}", f"run_dir={meta}")
    assert r.returncode == 0, r.stderr
    (m,) = metrics(meta)
    assert _close(m["loss"], nxt[5]), (m["loss"], nxt[5])


@pytest.mark.slow
def test_missing_and_unexpected_keys_strict_and_not(tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert launch(*SMALL, "trainer.max_steps=1", f"run_dir={src}").returncode == 0
    args = [*SMALL, "model.n_layer=3", "trainer.max_steps=1", f"checkpoint.load_from={src}"]
    r = launch(*args, f"run_dir={tmp_path / 'strict'}")
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr, "missing (in the model, not in the source)")
    assert "blocks.2.ln1.bias" in line and "(12 in all)" in line
    assert "unexpected (in the source, not in the model): none" in line
    r = launch(*args, "checkpoint.strict=false", f"run_dir={tmp_path / 'loose'}")
    assert r.returncode == 0, r.stderr
    assert "missing (in the model, not in the source): blocks.2.ln1.bias" in r.stderr + r.stdout


@pytest.mark.rotate("e2e-long")
def test_a_changed_model_is_refused_with_one_line_unless_allowed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = [*SMALL, "trainer.max_steps=2", f"run_dir={run}"]
    assert launch(*base).returncode == 0
    r = launch(*base[:-2], "trainer.max_steps=3", "model.dropout=0.1", f"run_dir={run}")
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr, "refusing to resume")
    assert "model.dropout: 0.0 -> 0.1" in line and "checkpoint.allow_config_change=true" in line
    assert len(metrics(run)) == 2
    r = launch(*base[:-2], "trainer.max_steps=3", "model.dropout=0.1", "checkpoint.allow_config_change=true",
               f"run_dir={run}")
    assert r.returncode == 0, r.stderr
    assert [e["step"] for e in _events(run) if e["event"] == "restore"] == [2]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    kept = [yaml.safe_load((run / "configs" / f"attempt-{i}.yaml").read_text())["model"]["dropout"] for i in (0, 1)]
    assert kept == [0.0, 0.1]


def test_deepspeed_with_load_from_is_refused_before_any_worker(tmp_path: Path) -> None:
    r = launch_here("recipe=gpt", "strategy=deepspeed", f"checkpoint.load_from={tmp_path}/x",
                    f"run_dir={tmp_path}/run")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "checkpoint.load_from is not supported with strategy=deepspeed" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_sigterm_preempted_warm_start_resumes_from_its_own_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert launch(*SMALL, "trainer.max_steps=2", f"run_dir={src}").returncode == 0
    run = tmp_path / "run"
    args = [*SMALL, "trainer.max_steps=400", "checkpoint.every_steps=1000", f"checkpoint.load_from={src}",
            f"run_dir={run}"]
    stopped = launch_and_sigterm(*args, run_dir=run, after_records=3)
    assert stopped.returncode == 75, stopped.stdout
    (stop,) = [e["step"] for e in _events(run) if e["event"] == "preempted"]
    r = launch(*SMALL, f"trainer.max_steps={stop + 2}", *args[-3:])  # the same command, a nearer end
    assert r.returncode == 0, r.stderr
    events = _events(run)
    assert [e["step"] for e in events if e["event"] == "restore"] == [stop]
    assert len([e for e in events if e["event"] == "warm_start"]) == 1
    assert [m["step"] for m in metrics(run)] == list(range(1, stop + 3))
