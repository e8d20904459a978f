"""The pieces of ft.mode=replicas that need no process: the batch split, the exactly-once
check (it must catch a skipped or doubled share) and the config's checks."""

from __future__ import annotations

import json

import pytest

from trainkit import rundir
from trainkit.config import load_config
from trainkit.errors import ConfigError, TrainkitError
from trainkit.ft import ledger
from trainkit.ft.loop import chunks


def test_any_membership_tiles_the_step_with_fixed_chunks():
    for n in (1, 2, 3):
        parts = sorted(p for r in range(n) for p in chunks(5, 12, 3, r, n))
        assert parts == [(60, 64), (64, 68), (68, 72)]
    assert chunks(0, 12, 3, 1, 2) == [(4, 8)]
    with pytest.raises(TrainkitError):
        chunks(0, 12, 3, 2, 2)


def _write(tmp_path, group, records):
    path = tmp_path / rundir.ft_ledger(group)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _commit(step, group, rank, n, t, loss=1.0):
    return {"step": step, "group": group, "rank": rank, "participants": n, "loss": loss, "time": t,
            "chunks": chunks(step, 4, 2, rank, n)}


def test_ledger_accepts_a_membership_change_and_rejects_a_lost_share(tmp_path):
    _write(tmp_path, 0, [_commit(0, 0, 0, 2, 1.0), _commit(1, 0, 0, 1, 2.0, 0.5)])
    _write(tmp_path, 1, [_commit(0, 1, 1, 2, 1.1)])
    acc = ledger.account(str(tmp_path), groups=2, steps=2, batch=4)
    assert acc.participants == [2, 1] and acc.losses == [1.0, 0.5]
    # A group that trained another share than the membership gives it:
    bad = {**_commit(1, 0, 0, 1, 2.0), "chunks": [[4, 6]]}
    _write(tmp_path, 0, [_commit(0, 0, 0, 2, 1.0), bad])
    with pytest.raises(TrainkitError, match="step 1: group 0 trained"):
        ledger.account(str(tmp_path), groups=2, steps=2, batch=4)
    # A step nobody committed:
    _write(tmp_path, 0, [_commit(0, 0, 0, 2, 1.0)])
    with pytest.raises(TrainkitError, match="step 1 was never committed"):
        ledger.account(str(tmp_path), groups=2, steps=2, batch=4)


def test_quorum_timeout_shorter_than_a_replacement_is_one_line():
    base = {"strategy": {"name": "ddp"}, "data": {"batch_size": 8}}
    with pytest.raises(ConfigError, match="ft.quorum_timeout_s=30.0 must exceed"):
        load_config({**base, "ft": {"mode": "replicas", "quorum_timeout_s": 30, "replacement_s": 40}})
    with pytest.raises(ConfigError, match="launcher=local or launcher=ray, strategy=ddp"):
        load_config({**base, "strategy": {"name": "fsdp"}, "ft": {"mode": "replicas"}})
    assert load_config({**base, "ft": {"mode": "replicas"}}).ft.groups == 2


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


def test_each_groups_store_listens_on_loopback_only():
    from trainkit.distributed import loopback_store

    store = loopback_store()
    store.set("k", "v")
    assert _listeners(store.port) == ["0100007F"]  # 127.0.0.1, and nothing on [::]


def test_a_grace_period_shorter_than_the_leave_is_one_line():
    """A group with a notice trains until its heartbeat has expired: the notice must outlast that."""
    base = {"strategy": {"name": "ddp"}, "data": {"batch_size": 8}}
    with pytest.raises(ConfigError, match=r"preemption.grace_seconds=3.0 must exceed ft.heartbeat_timeout_s \+ 0.2 = 5.2"):
        load_config({**base, "preemption": {"grace_seconds": 3}, "ft": {"mode": "replicas", "heartbeat_timeout_s": 5}})
    assert load_config({**base, "preemption": {"grace_seconds": 6}, "ft": {"mode": "replicas", "heartbeat_timeout_s": 5}})
