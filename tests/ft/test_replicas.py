"""ft.mode=replicas on launcher=local: real group processes, a real SIGKILL, a real lighthouse
on loopback; the data accounting and the losses read back from what the groups committed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit import rundir
from trainkit.config import load_config
from trainkit.ft import ledger
from trainkit.ft.loop import KILL_ENV, reference_losses

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STORE = str(ROOT / ".cache" / "test-store")

STEPS, BATCH = 80, 16  # 1280 positions: under one epoch of the 1527-sample digits set
OVERRIDES = [
    "recipe=resnet", "task=ft_paced:TASK", "model.width=8", "model.blocks=[1,1]", "model.image_size=8",
    f"data.batch_size={BATCH}", "optim.lr=0.1", "optim.schedule=constant", "optim.warmup_steps=0",
    "optim.weight_decay=0", "trainer.progress=off", f"trainer.max_steps={STEPS}", "strategy=ddp",
    "ft.mode=replicas", "ft.groups=2", "ft.heartbeat_timeout_s=1", "checkpoint.every_steps=20",
]
# Measured bound between any membership history and one group training every chunk alone
# (docs/fault-tolerance.md): with two groups the sum of two chunks is the same float sum.
LOSS_TOLERANCE = 0.0
# With three groups a step's sum over chunks associates differently by membership: losses
# measured within 4e-7 of the uninterrupted run for 50 steps, after which training at lr=0.1
# amplified the rounding (7e-3 by step 58); 40 steps and a margin keep the test about rounding.
THREE_GROUP_TOLERANCE = 1e-5


def launch(run_dir: Path, *extra: str, kill: str = "", groups: int = 2, **env_extra: str
           ) -> subprocess.CompletedProcess[str]:
    from ft_paced import GROUPS_ENV, LEDGERS_ENV

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINKIT_STORE": STORE,
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           LEDGERS_ENV: str(run_dir / rundir.FT_LEDGERS), GROUPS_ENV: str(groups), KILL_ENV: kill, **env_extra}
    return subprocess.run([sys.executable, "-m", "trainkit.launch", *OVERRIDES, f"run_dir={run_dir}", *extra],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def reference(run_dir: Path, *extra: str) -> list[float]:
    """The uninterrupted run, computed here: one replica, every chunk, no torchft."""
    from trainkit.launch.compose import compose_config

    sys_path = list(sys.path)
    sys.path.insert(0, str(HERE))
    old = os.environ.get("TRAINKIT_STORE")
    os.environ["TRAINKIT_STORE"] = STORE
    try:
        cfg = compose_config([*OVERRIDES, f"run_dir={run_dir}", *extra])
        return reference_losses(load_config(cfg.to_dict()).to_dict())
    finally:
        sys.path[:] = sys_path
        if old is None:
            os.environ.pop("TRAINKIT_STORE")
        else:
            os.environ["TRAINKIT_STORE"] = old


def sample_ids(run_dir: Path, acc: ledger.Accounting, groups: int = 2) -> list[int]:
    from trainkit.data import Stream

    stream = Stream(f"file://{STORE}/digits-8px/train")
    ids: list[int] = []
    for g, records in ledger.read(str(run_dir), groups).items():
        for rec in records:
            if "loss" in rec and rec["step"] not in acc.recomputed:
                for lo, hi in rec["chunks"]:
                    ids.extend(int(i) for i in stream.ids_at(0, lo, hi))
    return ids


@pytest.mark.rotate("ft-group-loss")
def test_a_group_killed_mid_allreduce_is_replaced_and_heals_from_its_peer(tmp_path):
    sys.path.insert(0, str(HERE))
    out = launch(tmp_path / "run", kill="1:3:allreduce")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "replica group 1 lost (exit code -9); starting its replacement" in out.stdout
    summary = rundir.read_summary(str(tmp_path / "run"))
    assert summary is not None and summary["ft"]["groups_lost"] == 1 and summary["ft"]["healed_from_peer"] == 1
    acc = ledger.account(str(tmp_path / "run"), groups=2, steps=STEPS, batch=BATCH)
    # The survivor redid the step the peer died in, then committed alone, then with the
    # replacement, which healed from it (not from a checkpoint).
    assert acc.redone >= 1
    assert acc.participants[:3] == [2, 2, 2] and acc.participants[3] == 1
    alone = [s for s, n in enumerate(acc.participants) if n == 1]
    # How many steps the survivor trains alone is the replacement's start-up time (4-10 steps
    # here, by load); what must hold is one unbroken stretch alone, then both again.
    assert alone == list(range(3, 3 + len(alone))) and acc.participants[-1] == 2, acc.participants
    assert [h["source"] for h in acc.healed[1]] == ["peer"], acc.healed
    assert not acc.recomputed
    # Every sample of the run's positions trained exactly once.
    ids = sample_ids(tmp_path / "run", acc)
    assert len(ids) == STEPS * BATCH == len(set(ids))
    expected = reference(tmp_path / "ref")
    worst = max(abs(a - b) for a, b in zip(acc.losses, expected))
    assert worst <= LOSS_TOLERANCE, (worst, acc.losses[:5], expected[:5])


@pytest.mark.slow
def test_every_group_killed_resumes_from_the_committed_checkpoint_not_step_0(tmp_path):
    """Both groups SIGKILLed after committing step 24 (checkpoint at 20): the replacements find
    no live peer, restore step 20 through the checkpointer, redo 20..24 with the same positions."""
    sys.path.insert(0, str(HERE))
    out = launch(tmp_path / "run", kill="0:24:commit,1:24:commit")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    acc = ledger.account(str(tmp_path / "run"), groups=2, steps=STEPS, batch=BATCH)
    heals = [h for g in (0, 1) for h in acc.healed.get(g, [])]
    # The first replacement to reach a quorum restores step 20; a later one heals from it.
    assert {h["step"] for h in heals if h["source"] == "checkpoint"} == {20}
    assert all(h["step"] >= 20 for h in heals)
    assert acc.recomputed == [20, 21, 22, 23, 24]
    assert "restored the committed checkpoint at step 20" in out.stdout
    ids = sample_ids(tmp_path / "run", acc)
    assert len(ids) == len(set(ids)) == (STEPS - 5) * BATCH  # the recomputed steps counted once, below
    expected = reference(tmp_path / "ref")
    assert max(abs(a - b) for a, b in zip(acc.losses, expected)) <= LOSS_TOLERANCE


@pytest.mark.slow
def test_three_groups_one_killed_between_steps(tmp_path):
    """Three groups, group 1 SIGKILLed right after committing step 5: the other two go on with
    the step's three chunks between them, the replacement heals from a peer and rejoins."""
    sys.path.insert(0, str(HERE))
    steps, batch = 40, 24  # 960 positions, under one epoch
    extra = ("ft.groups=3", f"data.batch_size={batch}", f"trainer.max_steps={steps}")
    out = launch(tmp_path / "run", *extra, kill="1:5:commit", groups=3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    acc = ledger.account(str(tmp_path / "run"), groups=3, steps=steps, batch=batch)
    assert acc.participants[:6] == [3] * 6 and acc.participants[6] == 2 and acc.participants[-1] == 3
    assert [h["source"] for h in acc.healed[1]] == ["peer"] and not acc.recomputed
    ids = sample_ids(tmp_path / "run", acc, groups=3)
    assert len(ids) == steps * batch == len(set(ids))
    expected = reference(tmp_path / "ref", *extra)
    worst = max(abs(a - b) for a, b in zip(acc.losses, expected))
    print(f"three groups: max |loss - uninterrupted| = {worst:.3g}")
    assert worst <= THREE_GROUP_TOLERANCE, worst


@pytest.mark.slow
def test_min_replicas_all_groups_waits_for_the_replacement(tmp_path):
    """ft.min_replicas=ft.groups, the bitwise mode for any number of groups: no step runs with
    fewer groups; the survivor waits in the quorum until the replacement has healed from it."""
    sys.path.insert(0, str(HERE))
    out = launch(tmp_path / "run", "ft.min_replicas=2", kill="1:3:allreduce")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    acc = ledger.account(str(tmp_path / "run"), groups=2, steps=STEPS, batch=BATCH)
    assert set(acc.participants) == {2} and acc.redone >= 1
    assert [h["source"] for h in acc.healed[1]] == ["peer"] and acc.healed[1][0]["step"] == 3
    expected = reference(tmp_path / "ref")
    assert acc.losses == expected


@pytest.mark.rotate("ft-group-loss")
def test_a_notice_backed_leave_costs_the_survivor_no_step(tmp_path):
    """Group 1 gets SIGTERM (a spot notice) at step 3. It stops heartbeating at once but keeps
    training its share, with its peer, without quorums, until the lighthouse's heartbeat
    timeout has passed; then it leaves and the survivor's next quorum forms without it: no step
    is redone, none is committed with a share missing, and the supervisor starts a replacement.
    Each chunk takes at least CHUNK_S, so the 1.2 s of heartbeat expiry spans at most ~25 of the
    40 steps and the survivor trains alone after it. The run does not wait for the replacement."""
    from ft_paced import CHUNK_S_ENV, LEDGERS_ENV

    sys.path.insert(0, str(HERE))
    steps, heartbeat = 40, 1.0
    extra = (f"trainer.max_steps={steps}", f"ft.heartbeat_timeout_s={heartbeat}")
    out = launch(tmp_path / "run", *extra, "cost.on_demand_usd_per_hour=2.0", kill="1:3:notice",
                 **{LEDGERS_ENV: "", CHUNK_S_ENV: "0.05"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "replica group 1 left the quorum on a notice; starting its replacement" in out.stdout
    summary = rundir.read_summary(str(tmp_path / "run"))
    assert summary is not None and summary["ft"]["groups_left"] == 1 and summary["ft"]["groups_lost"] == 0
    acc = ledger.account(str(tmp_path / "run"), groups=2, steps=steps, batch=BATCH)
    assert acc.redone == 0, acc  # nobody redid a step
    records = ledger.read(str(tmp_path / "run"), 2)
    leaving = [r for r in records[1] if r.get("event") == "leaving"]
    left = [r for r in records[1] if r.get("event") == "left"]
    assert [r["step"] for r in leaving] == [3] and len(left) == 1, records[1][-5:]
    k = left[0]["step"]
    # The leaver was silent for the whole heartbeat timeout before its peer formed a quorum
    # without it, and it trained its share of every step in that time (the window: no quorum).
    assert left[0]["silent_s"] >= heartbeat
    window = [r["step"] for r in records[0] if r.get("window")]
    assert window == list(range(4, k)) and window, (window, k)
    assert acc.participants[:k] == [2] * k and acc.participants[k] == 1, acc.participants
    ids = sample_ids(tmp_path / "run", acc)
    assert len(ids) == steps * BATCH == len(set(ids))
    expected = reference(tmp_path / "ref", *extra)
    assert max(abs(a - b) for a, b in zip(acc.losses, expected)) <= LOSS_TOLERANCE
    check_run_logs(tmp_path / "run", steps, attempts=1)


@pytest.mark.slow
def test_a_notice_backed_leave_with_three_groups(tmp_path):
    """Three groups, group 0 (replica rank 0, the one that saves) given a notice at step 3: the
    other two go on with all three chunks after its window, nobody redoes a step."""
    from ft_paced import CHUNK_S_ENV, LEDGERS_ENV

    sys.path.insert(0, str(HERE))
    steps, batch = 40, 24
    extra = ("ft.groups=3", f"data.batch_size={batch}", f"trainer.max_steps={steps}")
    out = launch(tmp_path / "run", *extra, kill="0:3:notice", groups=3, **{LEDGERS_ENV: "", CHUNK_S_ENV: "0.05"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    acc = ledger.account(str(tmp_path / "run"), groups=3, steps=steps, batch=batch)
    assert acc.redone == 0, acc
    left = [r for r in ledger.read(str(tmp_path / "run"), 3)[0] if r.get("event") == "left"]
    assert len(left) == 1 and left[0]["silent_s"] >= 1.0
    k = left[0]["step"]
    assert k > 4 and acc.participants[:k] == [3] * k and acc.participants[k] == 2, acc.participants
    ids = sample_ids(tmp_path / "run", acc, groups=3)
    assert len(ids) == steps * batch == len(set(ids))
    expected = reference(tmp_path / "ref", *extra)
    assert max(abs(a - b) for a, b in zip(acc.losses, expected)) <= THREE_GROUP_TOLERANCE


def check_run_logs(run: Path, steps: int, *, attempts: int) -> None:
    """metrics.jsonl, events.jsonl and summary.json in the schema the restart mode writes, so
    the report, goodput/badput and cost read a replicas run as any other."""
    from trainkit.cost import BUCKETS
    from trainkit.report.load import load_run
    from trainkit.report.render import summarize

    metrics, events = rundir.read_metrics(str(run)), rundir.read_events(str(run))
    # Every log_every (10) steps, and where an attempt stopped on a notice (as the restart mode).
    stops = {e["step"] for e in rundir.of(events, rundir.PREEMPTED)}
    assert [r["step"] for r in metrics][-1] == steps, metrics
    assert all(r["step"] % 10 == 0 or r["step"] in stops for r in metrics), metrics
    assert all(1 <= r["ft_groups"] <= 2 and r["step_time_s"] > 0 for r in metrics)
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == attempts and kinds[-1] == "finish" and "checkpoint" in kinds, kinds
    summary = rundir.read_summary(str(run))
    assert summary is not None and summary["attempts"] == attempts and set(summary["badput_s"]) == set(BUCKETS)
    assert 0 < summary["goodput"] <= 1 and summary["cost_usd"] > 0 and summary["cost"]["usd"] == summary["cost_usd"]
    report = summarize(load_run(str(run)))
    assert report["finished"] and report["cost_usd"] > 0


@pytest.mark.slow
def test_a_notice_to_the_whole_job_checkpoints_once_and_resumes(tmp_path):
    """SIGTERM to the launcher (relayed to every group): with no group left to go on, the
    groups agree on one step, the one with replica rank 0 saves it, all exit 75 and nothing is
    replaced; the relaunch restores that step and every position is still trained once."""
    import signal
    import time

    from ft_paced import CHUNK_S_ENV, GROUPS_ENV, LEDGERS_ENV

    sys.path.insert(0, str(HERE))
    steps = 40
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainkit.launch", *OVERRIDES, f"run_dir={run}", f"trainer.max_steps={steps}",
           "cost.on_demand_usd_per_hour=2.0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINKIT_STORE": STORE, GROUPS_ENV: "2", LEDGERS_ENV: "",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), CHUNK_S_ENV: "0.05"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while '"step": 5,' not in _text(run / rundir.ft_ledger(0)) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, first[-3000:]
    assert "starting its replacement" not in first
    records = ledger.read(str(run), 2)
    stops = [r["step"] for g in (0, 1) for r in records[g] if r.get("event") == "preempted"]
    assert len(stops) == 2 and len(set(stops)) == 1, stops
    kinds = [e["event"] for e in rundir.read_events(str(run))]
    assert kinds[0] == "start" and kinds[-1] == "preempted", kinds
    out = launch(run, f"trainer.max_steps={steps}", "cost.on_demand_usd_per_hour=2.0",
                 **{LEDGERS_ENV: "", CHUNK_S_ENV: "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"restored the committed checkpoint at step {stops[0]}" in out.stdout
    acc = ledger.account(str(run), groups=2, steps=steps, batch=BATCH)
    assert not acc.recomputed and acc.redone == 0
    ids = sample_ids(run, acc)
    assert len(ids) == steps * BATCH == len(set(ids))
    expected = reference(tmp_path / "ref", f"trainer.max_steps={steps}")
    assert max(abs(a - b) for a, b in zip(acc.losses, expected)) <= LOSS_TOLERANCE
    check_run_logs(run, steps, attempts=2)
    assert "restore" in [e["event"] for e in rundir.read_events(str(run))]


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
