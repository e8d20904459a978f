"""The chaos harness in ft.mode=replicas: faults that take one replica group at a time, every
group at once, or the whole launch; exactly-once data and the loss bound checked from the
groups' ledgers against an uninterrupted run."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launching import ROOT
from trainkit.chaos.replicas import KINDS, Fault, ReplicaHarness, check, group_processes, plan

HERE = Path(__file__).resolve().parent
STORE = str(ROOT / ".cache" / "test-store")


def test_plan_and_the_group_processes_a_fault_strikes():
    faults = plan(3, 2, 1, 1, 100, 3, random.Random(4), margin=10)
    assert sorted(f.kind for f in faults) == sorted(["kill-group"] * 3 + ["notice-group"] * 2
                                                    + ["kill-all-groups", "kill-launch"])
    assert [f.at_step for f in faults] == sorted(f.at_step for f in faults) and all(2 <= f.at_step <= 90 for f in faults)
    assert all((f.group is not None and 0 <= f.group < 3) == f.kind.endswith("-group") for f in faults)
    assert set(KINDS) == {f.kind for f in faults}
    # A real process tree: a launch-like parent, one child whose command line is a group's.
    child = "import time; time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               f"'-c', {child!r}, '-m', 'trainkit.ft', 'config.json', '1']); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while not (found := group_processes(psutil.Process(parent.pid))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(found) == [1]
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_replicas_chaos_one_group_then_all_then_the_launch(tmp_path, monkeypatch):
    """Two groups; group 1 SIGKILLed, group 0 given a notice, both SIGKILLed at once, then the
    whole launch: every fault recovered from, every sample trained once in the final model,
    losses bitwise those of an uninterrupted run."""
    from trainkit.config import load_config
    from trainkit.ft.loop import reference_losses
    from trainkit.launch.compose import compose_config

    ft_tests = str(ROOT / "tests" / "ft")
    monkeypatch.syspath_prepend(ft_tests)
    monkeypatch.setenv("TRAINKIT_STORE", STORE)
    overrides = [
        "recipe=resnet", "task=ft_paced:TASK", "model.width=8", "model.blocks=[1,1]", "model.image_size=8",
        "data.batch_size=16", "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.weight_decay=0", "trainer.max_steps=1500", "strategy=ddp", "ft.mode=replicas", "ft.groups=2",
        "ft.heartbeat_timeout_s=1", "checkpoint.every_steps=50",
    ]
    # Every chunk takes >= 20 ms, so the survivors keep training while a replacement starts.
    env = {"TRAINKIT_STORE": STORE, "PYTHONPATH": ft_tests, "FT_TEST_CHUNK_S": "0.02"}
    harness = ReplicaHarness(overrides, str(tmp_path), 2, env=env, timeout=600)
    faults = [Fault("kill-group", 20, 1), Fault("notice-group", 0, 0), Fault("kill-all-groups", 0),
              Fault("kill-launch", 0)]
    report = harness.run(faults)
    cfg = load_config(compose_config(overrides).to_dict())
    check(report, harness.run_dir, cfg, reference_losses(cfg.to_dict()), 0.0)
    log = (tmp_path / "launch.log").read_text()[-4000:]
    assert report.ok, (report, log)
    assert [d.fault.kind for d in report.delivered] == [f.kind for f in faults]
    assert all(d.recovered for d in report.delivered), (report.delivered, log)
    assert report.launches == [-9, 0] and report.max_loss_diff == 0.0
    assert "left the quorum on a notice" in log and "restored the committed checkpoint" in log
