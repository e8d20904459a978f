"""strategy=accelerate: Accelerate's DDP under trainkit's launcher trains like strategy=ddp.

Same seed, same data, same step: the per-step losses and the weights after training equal
strategy=ddp's to float tolerance, also across a relaunch that resumes mid-run, and the
process count Accelerate itself reports is the launched world size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from launching import GPT_TINY, RESNET_TINY, launch, launch_here, losses
from trainkit import rundir

# grad_accum=2 takes the no_sync micro-step and Accelerate's loss scaling.
CASES = {
    "gpt": [*GPT_TINY, "trainer.grad_accum=2"],
    "resnet": RESNET_TINY,
}


def _train(tmp_path: Path, recipe: str, strategy: str, *stops: int) -> tuple[Path, str]:
    """Trains to step 12, relaunching at each of ``stops`` (the relaunch resumes)."""
    run_dir = tmp_path / strategy
    out = ""
    for stop in (*stops, 12):
        result = launch(*CASES[recipe], f"strategy={strategy}", "launcher.workers=2", f"trainer.max_steps={stop}",
                        "optim.schedule=constant", f"run_dir={run_dir}")
        assert result.returncode == 0, result.stdout + result.stderr
        out += result.stdout
    return run_dir, out


@pytest.mark.rotate("parity")
@pytest.mark.parametrize("recipe", [
    "gpt",
    # The resnet case takes ~30 s more; gpt is the proof, in rotation with the other parity tests.
    pytest.param("resnet", marks=pytest.mark.slow),
])
def test_accelerate_matches_ddp(tmp_path: Path, recipe: str) -> None:
    # Stopped at step 6 and relaunched: the Accelerate-wrapped state resumes through trainkit's checkpoint.
    acc_dir, out = _train(tmp_path, recipe, "accelerate", 6)
    assert "accelerate: 2 processes (MULTI_CPU), mixed precision no" in out
    assert "resumed from checkpoint at step 6" in out
    curve = losses(acc_dir)
    assert len(curve) == 12 and sum(curve[-3:]) < 0.9 * sum(curve[:3]), curve
    ddp_dir, _ = _train(tmp_path, recipe, "ddp")
    for ours, theirs in zip(curve, losses(ddp_dir)):
        assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (curve, losses(ddp_dir))
    ours, theirs = load_file(acc_dir / rundir.EXPORT), load_file(ddp_dir / rundir.EXPORT)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert (value - theirs[key]).abs().max() <= 1e-5 * max(1.0, theirs[key].abs().max()), key


@pytest.mark.parametrize("plugin", ["fsdp", "deepspeed"])
def test_accelerate_plugin_on_cpu_is_refused(tmp_path: Path, plugin: str) -> None:
    result = launch_here("recipe=gpt", "strategy=accelerate", f"strategy.plugin={plugin}", "launcher.workers=2",
                         f"run_dir={tmp_path}")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: strategy=accelerate") and plugin in line.lower(), line


def test_accelerate_launch_fsdp_environment_on_cpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch --use_fsdp`` leaves ACCELERATE_USE_FSDP=true: refused, not DDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    result = launch_here(*GPT_TINY, "strategy=accelerate", "launcher.workers=2", f"run_dir={tmp_path}")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert "fsdp plugin needs GPUs" in line, line
