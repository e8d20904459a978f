"""The chaos harness on CPU with 2 workers: random SIGKILLs (some mid-save) and SIGTERMs,
relaunch until done; the result must be bitwise the uninterrupted run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from launching import GPT_TINY, ROOT
from trainkit.chaos.__main__ import Harness, compare, plan

# Wide enough that a checkpoint (~20 MB with AdamW state) takes long enough to be hit mid-save.
# At the recipe's default log_every (10): records between two logging steps survive a kill or
# a stop exactly because the logging window is part of the checkpoint.
OVERRIDES = [*[o for o in GPT_TINY if not o.startswith("trainer.log_every=")], "model.d_model=256", "model.n_head=4",
             "strategy=ddp", "launcher.workers=2", "checkpoint.every_steps=3"]


def _run(tmp_path: Path, steps: int, kills: int, sigterms: int, seed: int) -> None:
    overrides = [*OVERRIDES, f"trainer.max_steps={steps}"]
    harness = Harness(overrides, str(tmp_path), env={"TRAINKIT_STORE": str(ROOT / ".cache" / "test-store")})
    faults = plan(kills, sigterms, steps, random.Random(seed), margin=20)
    reference = harness.run_reference()
    chaos, attempts = harness.run_chaos(faults, seed)
    report = compare(reference, chaos, attempts)
    log = (tmp_path / "launch.log").read_text()[-3000:]
    assert report.ok, (report, log)
    exits = [a.exit_code for a in attempts]
    assert exits.count(75) == sigterms, (attempts, log)
    kill_attempts = [a for a in attempts if a.fault.startswith("kill")]
    assert len(kill_attempts) == kills and all(a.exit_code != 0 for a in kill_attempts), attempts
    assert any(a.mid_save for a in kill_attempts), attempts
    assert exits[-1] == 0


@pytest.mark.rotate("e2e-long")
def test_chaos_three_kills_one_sigterm(tmp_path: Path) -> None:
    """The default sample: a kill mid-save, two other kills and a SIGTERM (the 20-kill run is slow)."""
    _run(tmp_path, steps=45, kills=3, sigterms=1, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 25 launches of a 2-worker run: 4.5 min on 2 idle cores, >10 min loaded
def test_chaos_twenty_kills(tmp_path: Path) -> None:
    _run(tmp_path, steps=200, kills=20, sigterms=4, seed=7)
