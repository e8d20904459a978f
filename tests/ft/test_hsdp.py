"""ft.mode=replicas with several processes per replica group (strategy=fsdp, HSDP-style):
real group processes sharding the model with FSDP2 over gloo, a real SIGKILL of one process,
a real lighthouse on loopback; the data accounting and the losses read back from what every
rank committed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit import rundir
from trainkit.config import load_config
from trainkit.errors import ConfigError, TrainkitError
from trainkit.ft import ledger

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STORE = str(ROOT / ".cache" / "test-store")

STEPS, BATCH, WORKERS, HEARTBEAT = 30, 16, 2, 1.0  # 480 positions, 4 per slice
OVERRIDES = [
    "recipe=resnet", "task=ft_paced:TASK", "model.width=8", "model.blocks=[1,1]", "model.image_size=8",
    f"data.batch_size={BATCH}", "optim.lr=0.1", "optim.schedule=constant", "optim.warmup_steps=0",
    "optim.weight_decay=0", "trainer.progress=off", f"trainer.max_steps={STEPS}", "strategy=fsdp",
    f"launcher.workers={WORKERS}", "ft.mode=replicas", "ft.groups=2", f"ft.heartbeat_timeout_s={HEARTBEAT}",
    "checkpoint.every_steps=10",
]
# Measured bound between a 2 x 2 run with a group lost and replaced and the uninterrupted
# 2 x 2 run: each chunk's slices are reduce-scattered inside one group whatever the
# membership, and with two groups a step sums two chunks, the same float sum in any order.
LOSS_TOLERANCE = 0.0


def launch(run_dir: Path, *extra: str, kill: str = "", **env_extra: str) -> subprocess.CompletedProcess[str]:
    from ft_paced import GROUPS_ENV, LEDGERS_ENV

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINKIT_STORE": STORE,
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           LEDGERS_ENV: str(run_dir / rundir.FT_LEDGERS), GROUPS_ENV: "2", "TRAINKIT_FT_KILL": kill, **env_extra}
    return subprocess.run([sys.executable, "-m", "trainkit.launch", *OVERRIDES, f"run_dir={run_dir}", *extra],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def ranks(run: Path, groups: int = 2) -> dict[int, dict[int, list[dict]]]:
    """rank -> group -> that process's ledger records, every incarnation."""
    return {r: ledger.read(str(run), groups, r) for r in range(WORKERS)}


def slice_ids(run: Path, acc: ledger.Accounting) -> list[int]:
    """The sample ids every rank trained in the commits that count (a step redone after a
    restore from the checkpoint counts once, below)."""
    from trainkit.data import Stream

    stream = Stream(f"file://{STORE}/digits-8px/train")
    ids: list[int] = []
    for by_group in ranks(run).values():
        for records in by_group.values():
            for rec in records:
                if "loss" in rec and rec["step"] not in acc.recomputed:
                    for lo, hi in rec["slices"]:
                        ids.extend(int(i) for i in stream.ids_at(0, lo, hi))
    return ids


def survivors_next_step(logs: dict[int, dict[int, list[dict]]], killed: dict) -> tuple[float, float]:
    """Seconds from the kill until every rank of group 0 had (its quorum without the lost group,
    its commit) of the step after the killed process's last commit. The first is the mechanism
    (the lost group's heartbeat expiring, the new quorum); the second adds the step's compute,
    which on the shared 2-core test machine competes with the replacement's start-up (timed in
    the benchmarks)."""
    step = killed["step"] + (killed["point"] == "commit")
    firsts = [min((r for r in by_group[0] if "loss" in r and r["step"] == step), key=lambda r: r["time"])
              for by_group in logs.values()]
    assert all(r["participants"] == 1 for r in firsts), firsts
    quorum = max(r["time"] - r["step_s"] + r["quorum_s"] for r in firsts)
    return quorum - killed["time"], max(r["time"] for r in firsts) - killed["time"]


def test_config_takes_fsdp_groups_of_several_processes_on_launcher_local():
    base = {"task": "resnet", "recipe": "resnet", "data": {"batch_size": 16}}
    cfg = load_config({**base, "strategy": {"name": "fsdp"}, "launcher": {"name": "local", "workers": 2},
                       "ft": {"mode": "replicas"}})
    assert cfg.ft.groups * cfg.launcher.workers == 4
    ddp = load_config({**base, "launcher": {"name": "local", "workers": 2}, "ft": {"mode": "replicas"}})
    assert ddp.strategy.name == "ddp" and ddp.launcher.workers == 2
    for strategy, launcher, why in (("fsdp", {"name": "local", "workers": 1}, "fsdp and launcher.workers >= 2"),
                                    ("ddp", {"name": "ray", "workers": 2}, "strategy=ddp and launcher.workers=1"),
                                    ("fsdp", {"name": "ray", "workers": 2}, "launcher=local, strategy=ddp or fsdp")):
        with pytest.raises(ConfigError, match=why):
            load_config({**base, "strategy": {"name": strategy}, "launcher": launcher, "ft": {"mode": "replicas"}})
    with pytest.raises(ConfigError, match="a multiple of ft.groups x launcher.workers = 6"):
        load_config({**base, "strategy": {"name": "fsdp"}, "launcher": {"name": "local", "workers": 3},
                     "ft": {"mode": "replicas"}})


def test_the_accounting_checks_every_ranks_slices(tmp_path):
    """Each rank's commit must hold its slice of each of the group's chunks, in the commit's
    incarnation; a rank that trained another slice, or none, fails the check with its step."""
    from trainkit.ft.loop import chunks, shard

    run = tmp_path / "run"
    (run / "ft").mkdir(parents=True)

    def write(slices_of=shard, skip: tuple[int, int, int] | None = None) -> None:
        for g in range(2):
            for r in range(2):
                lines = []
                for step in range(2):
                    if (g, r, step) == skip:
                        continue
                    parts = chunks(step, 8, 2, g, 2)
                    lines.append({"step": step, "group": g, "rank": g, "participants": 2, "chunks": parts,
                                  "loss": 1.0 + step, "time": float(step), "step_s": 0.1, "group_rank": r,
                                  "slices": [slices_of(p, 2, r) for p in parts], "incarnation": 0})
                (run / rundir.ft_ledger(g, r)).write_text("".join(json.dumps(x) + "\n" for x in lines))

    write()
    acc = ledger.account(str(run), groups=2, steps=2, batch=8, workers=2)
    assert acc.participants == [2, 2]
    write(slices_of=lambda p, w, r: shard(p, w, 0))  # rank 1 trained rank 0's slice again
    with pytest.raises(TrainkitError, match=r"step 0: rank 1 of replica group 0 trained \[\[0, 2\]\].* \[\[2, 4\]\]"):
        ledger.account(str(run), groups=2, steps=2, batch=8, workers=2)
    write(skip=(1, 1, 1))
    with pytest.raises(TrainkitError, match="step 1: rank 1 of replica group 1 has no commit of it"):
        ledger.account(str(run), groups=2, steps=2, batch=8, workers=2)


@pytest.mark.slow
def test_a_process_killed_mid_allreduce_takes_its_group_whose_replacement_heals_per_rank(tmp_path):
    """Rank 1 of group 1 SIGKILLed while its peers wait in the step's all-reduce: the supervisor
    kills the rest of group 1, group 0 (both ranks) redoes the step and commits the next one
    alone within the heartbeat timeout + 1 s, the replacement group's rank i heals its shards
    from rank i of group 0, and the losses match the uninterrupted 2 x 2 run."""
    sys.path.insert(0, str(HERE))
    out = launch(tmp_path / "run", kill="1.1:3:allreduce")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "replica group 1 lost (exit code" in out.stdout
    run = tmp_path / "run"
    summary = rundir.read_summary(str(run))
    assert summary is not None and summary["ft"]["groups_lost"] == 1 and summary["ft"]["workers_per_group"] == 2
    # Every process is a worker the run pays for (a price per worker reads the start's world_size).
    assert summary["world_size"] == 4 and rundir.of(rundir.read_events(str(run)), rundir.START)[0]["world_size"] == 4
    acc = ledger.account(str(run), groups=2, steps=STEPS, batch=BATCH, workers=WORKERS)
    assert acc.redone >= 1 and not acc.recomputed
    assert acc.participants[:3] == [2, 2, 2] and acc.participants[3] == 1 and acc.participants[-1] == 2
    logs = ranks(run)
    # Every rank of the replacement healed from a peer, at the same step (rank i from rank i:
    # another rank's shards would change the losses, compared below).
    heals = {r: [h for h in logs[r][1] if h.get("event") == "healed"] for r in range(WORKERS)}
    assert [h["source"] for r in heals for h in heals[r]] == ["peer"] * WORKERS, heals
    assert len({h["step"] for r in heals for h in heals[r]}) == 1
    # The survivors' next commit after the kill.
    killed = next(r for r in logs[1][1] if r.get("event") == "killed")
    quorum, commit = survivors_next_step(logs, killed)
    print(f"kill -> survivors' quorum without the lost group {quorum:.2f} s, their next commit {commit:.2f} s")
    assert quorum <= HEARTBEAT + 1.0, (quorum, commit)
    ids = slice_ids(run, acc)
    assert len(ids) == STEPS * BATCH == len(set(ids))
    ref = launch(tmp_path / "ref")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    expected = ledger.account(str(tmp_path / "ref"), groups=2, steps=STEPS, batch=BATCH, workers=WORKERS).losses
    worst = max(abs(a - b) for a, b in zip(acc.losses, expected))
    print(f"2 x 2: max |loss - uninterrupted| = {worst:.3g}")
    assert worst <= LOSS_TOLERANCE, (worst, acc.losses[:6], expected[:6])


@pytest.mark.slow
def test_every_group_killed_resumes_every_rank_from_the_committed_checkpoint(tmp_path):
    """Both groups (all four processes) SIGKILLed after committing step 14 (checkpoint at 10,
    saved by both ranks of the group with replica rank 0 through DCP): the replacements find no
    live peer, restore step 10, redo 10..14 with the same positions."""
    sys.path.insert(0, str(HERE))
    out = launch(tmp_path / "run", kill="0:14:commit,1:14:commit")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "run"
    acc = ledger.account(str(run), groups=2, steps=STEPS, batch=BATCH, workers=WORKERS)
    heals = [h for by_group in ranks(run).values() for g in by_group.values() for h in g
             if h.get("event") == "healed"]
    assert {h["step"] for h in heals if h["source"] == "checkpoint"} == {10} and all(h["step"] >= 10 for h in heals)
    assert acc.recomputed == [10, 11, 12, 13, 14]
    ids = slice_ids(run, acc)
    assert len(ids) == len(set(ids)) == (STEPS - 5) * BATCH
    ref = launch(tmp_path / "ref")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    expected = ledger.account(str(tmp_path / "ref"), groups=2, steps=STEPS, batch=BATCH, workers=WORKERS).losses
    worst = max(abs(a - b) for a, b in zip(acc.losses, expected))
    print(f"2 x 2 after a restore: max |loss - uninterrupted| = {worst:.3g}")
    assert worst <= LOSS_TOLERANCE, worst


@pytest.mark.slow
def test_a_notice_to_one_process_makes_its_whole_group_leave_without_a_redo(tmp_path):
    """Rank 1 of group 1 gets SIGTERM (a spot notice) at step 3: its group agrees to leave as
    one, trains its share through the heartbeat expiry, then both its processes exit; group 0
    goes on alone with no step redone, and a replacement group is started. The run's metrics,
    events and summary read as the restart mode's, from rank 0's ledgers."""
    from ft_paced import CHUNK_S_ENV, LEDGERS_ENV

    sys.path.insert(0, str(HERE))
    from test_replicas import check_run_logs

    out = launch(tmp_path / "run", "cost.on_demand_usd_per_hour=2.0", kill="1.1:3:notice",
                 **{LEDGERS_ENV: "", CHUNK_S_ENV: "0.05"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "replica group 1 left the quorum on a notice; starting its replacement" in out.stdout
    run = tmp_path / "run"
    acc = ledger.account(str(run), groups=2, steps=STEPS, batch=BATCH, workers=WORKERS)
    assert acc.redone == 0, acc
    logs = ranks(run)
    left = {r: [x["step"] for x in logs[r][1] if x.get("event") == "left"] for r in range(WORKERS)}
    assert len(left[0]) == 1 and left[0] == left[1], left
    k = left[0][0]
    assert acc.participants[:k] == [2] * k and acc.participants[k] == 1, acc.participants
    ids = slice_ids(run, acc)
    assert len(ids) == STEPS * BATCH == len(set(ids))
    check_run_logs(run, STEPS, attempts=1)


@pytest.mark.slow
def test_ddp_inside_groups_with_rank_0_killed_between_steps(tmp_path):
    """strategy=ddp with two processes per group (each holds the whole model; FSDP2's HSDP
    layout with shards of one): rank 0 of group 1, the one that hosts its group's store and
    ManagerServer, SIGKILLed right after committing step 5. Group 0 goes on alone, the
    replacement group heals per rank from it, and the losses equal the uninterrupted run's."""
    sys.path.insert(0, str(HERE))
    out = launch(tmp_path / "run", "strategy=ddp", kill="1.0:5:commit")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "run"
    acc = ledger.account(str(run), groups=2, steps=STEPS, batch=BATCH, workers=WORKERS)
    assert acc.participants[:6] == [2] * 6 and acc.participants[6] == 1 and acc.participants[-1] == 2
    logs = ranks(run)
    assert [h["source"] for r in logs for h in logs[r][1] if h.get("event") == "healed"] == ["peer"] * WORKERS
    killed = next(r for r in logs[0][1] if r.get("event") == "killed")
    quorum, commit = survivors_next_step(logs, killed)
    print(f"kill between steps -> survivors' quorum {quorum:.2f} s, their next commit {commit:.2f} s")
    assert quorum <= HEARTBEAT + 1.0, (quorum, commit)
    ids = slice_ids(run, acc)
    assert len(ids) == STEPS * BATCH == len(set(ids))
    ref = launch(tmp_path / "ref", "strategy=ddp")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    expected = ledger.account(str(tmp_path / "ref"), groups=2, steps=STEPS, batch=BATCH, workers=WORKERS).losses
    assert max(abs(a - b) for a, b in zip(acc.losses, expected)) <= LOSS_TOLERANCE
