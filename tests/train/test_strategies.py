"""Every strategy trains both recipes through the real launcher, with loss going down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launching import GPT_TINY, RESNET_TINY, launch, losses

STRATEGIES = {
    "single": ["strategy=single", "launcher.workers=1"],
    "ddp": ["strategy=ddp", "launcher.workers=2"],
    "fsdp": ["strategy=fsdp", "launcher.workers=2"],
    "zero2": ["strategy=deepspeed", "strategy.zero_stage=2", "launcher.workers=2"],
    "zero3": ["strategy=deepspeed", "strategy.zero_stage=3", "launcher.workers=2"],
}
RECIPES = {"resnet": RESNET_TINY, "gpt": GPT_TINY}
# By default one strategy per recipe, in rotation (tests/conftest.py): test_features.py and the
# resume tests train every strategy through the launcher as well; --runslow runs the whole matrix.
CASES = [
    pytest.param(strategy, recipe, id=f"{strategy}-{recipe}", marks=pytest.mark.rotate(f"strategy-{recipe}"))
    for strategy in STRATEGIES for recipe in RECIPES
]


@pytest.mark.parametrize(("strategy", "recipe"), CASES)
def test_strategy_trains_recipe(tmp_path: Path, strategy: str, recipe: str) -> None:
    run_dir = tmp_path / "run"
    result = launch(*RECIPES[recipe], *STRATEGIES[strategy], "trainer.max_steps=16", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    curve = losses(run_dir)
    assert len(curve) == 16
    assert sum(curve[-4:]) / 4 < 0.9 * sum(curve[:4]) / 4, curve
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["strategy"] == STRATEGIES[strategy][0].split("=")[1]
    assert "trainkit run summary" in result.stdout
