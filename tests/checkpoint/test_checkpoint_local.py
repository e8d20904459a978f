"""Single-process Checkpointer behaviour on a local disk (file://): the protocol itself."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainkit.checkpoint import (Checkpointer, CheckpointMismatch, ModelOptimState, RNGState, SavePolicy,
                                 export_safetensors, load_for_export, rng_state, set_rng_state)
from trainkit.checkpoint._dcp_io import is_data_file, safe_load_metadata
from trainkit.checkpoint._store import record_of, step_name
from trainkit.errors import StorageError


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model, opt):
    x = torch.randn(4, 8) * (1 + random.random() + float(np.random.rand()))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def snapshot(model, opt) -> dict[str, torch.Tensor]:
    out = {f"m.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"o.{pid}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_of(model, opt, meta):
    return {"app": ModelOptimState(model, opt), "meta": meta, "rng": RNGState()}


RAW1 = Path(__file__).resolve().parent / "data" / "raw1"


def raw1_copy(tmp_path) -> Path:
    """A copy of checkpoints written by trainkit before the safetensors shards
    (trainkit-raw/1, by data/make_raw1.py at commit 2dfb1ef): steps 1 and 2 of ``make()``."""
    root = tmp_path / "raw1"
    shutil.copytree(RAW1 / "checkpoints", root)
    return root


def seed_all(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def test_single_resume_is_bitwise(tmp_path):
    root = str(tmp_path / "ck")
    model, opt = make()
    seed_all(1)
    meta = {"step": 0, "tag": ("a", 1), "lrs": [0.1, float("inf")], "raw": b"\x00\xff", "dt": torch.bfloat16}
    ck = Checkpointer(root)
    for s in range(1, 7):
        step(model, opt)
        meta["step"] = s
        if s == 3:
            ck.save(s, state_of(model, opt, meta))
    ck.close()
    final = snapshot(model, opt)

    model2, opt2 = make(seed=99)
    seed_all(12345)  # the RNG streams must come from the checkpoint
    meta2 = {"step": -1}
    ck2 = Checkpointer(root)
    assert ck2.latest_step() == 3 and ck2.steps() == [3]
    assert ck2.load(state_of(model2, opt2, meta2)) == 3
    assert meta2 == {"step": 3, "tag": ("a", 1), "lrs": [0.1, float("inf")], "raw": b"\x00\xff", "dt": torch.bfloat16}
    for _ in range(4, 7):
        step(model2, opt2)
    assert same(final, snapshot(model2, opt2))
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)


def test_empty_root_loads_nothing(tmp_path):
    model, opt = make()
    ck = Checkpointer(str(tmp_path / "none"))
    assert ck.latest_step() is None and ck.steps() == []
    assert ck.load(state_of(model, opt, {"step": 0})) is None


def test_rng_state_roundtrip_is_json():
    seed_all(7)
    d = rng_state()
    json.dumps(d)
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(json.loads(json.dumps(d)))
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _two_checkpoints(root):
    model, opt = make()
    seed_all(0)
    ck = Checkpointer(root, keep_last=5, async_save=False)
    snaps = {}
    for s in (1, 2):
        step(model, opt)
        ck.save(s, state_of(model, opt, {"step": s}))
        snaps[s] = snapshot(model, opt)
    ck.close()
    return snaps


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["no_manifest", "truncate_shard", "flip_byte", "bad_manifest", "drop_rank_json"])
def test_torn_checkpoint_is_skipped(tmp_path, damage):
    root = tmp_path / "ck"
    snaps = _two_checkpoints(str(root))
    d2 = root / "step_000000002"
    if damage == "no_manifest":
        (d2 / "manifest.json").unlink()
    elif damage == "truncate_shard":
        shard = d2 / "__0_0.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "flip_byte":
        _flip_byte(d2 / "__0_0.safetensors")
    elif damage == "bad_manifest":
        (d2 / "manifest.json").write_text('{"format": "trainkit-checkpoint/1", "st')
    elif damage == "drop_rank_json":
        (d2 / "rank_00000.json").unlink()
    model, opt = make(seed=5)
    meta = {"step": -1}
    ck = Checkpointer(str(root))
    with pytest.warns(UserWarning, match="step_000000002"):
        assert ck.load(state_of(model, opt, meta)) == 1
    assert meta["step"] == 1
    assert same(snaps[1], snapshot(model, opt))
    # the bad step is no longer offered, and a new save of step 2 commits over it
    assert ck.latest_step() == 1
    ck.save(2, state_of(model, opt, meta), blocking=True)
    assert ck.latest_step() == 2
    assert ck.load(state_of(*make(), {"step": 0})) == 2


def test_explicit_corrupt_step_raises(tmp_path):
    root = tmp_path / "ck"
    _two_checkpoints(str(root))
    _flip_byte(root / "step_000000002" / "__0_0.safetensors")
    model, opt = make()
    with pytest.raises(StorageError, match="checksum"):
        Checkpointer(str(root)).load(state_of(model, opt, {"step": 0}), step=2)


def test_same_size_garbage_is_caught_by_checksums_not_by_sizes(tmp_path):
    root = tmp_path / "ck"
    snaps = _two_checkpoints(str(root))
    shard = root / "step_000000002" / "__0_0.safetensors"
    data = shard.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")  # the safetensors header stays readable
    shard.write_bytes(data[:start] + b"\x00" * (len(data) - start))  # same size, garbage tensors
    model, opt = make(seed=3)
    assert Checkpointer(str(root), verify="size").load(state_of(model, opt, {"step": 0}), step=2) == 2
    assert not same(snaps[2], snapshot(model, opt))  # sizes say nothing about content
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert Checkpointer(str(root)).load(state_of(model, opt, {"step": 0})) == 1
    assert same(snaps[1], snapshot(model, opt))


def test_malicious_metadata_is_never_unpickled(tmp_path):
    """New checkpoints hold no pickle at all; a trainkit-raw/1 one still has DCP's pickled
    .metadata, which is read through an allow-list."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with pytest.raises(pickle.UnpicklingError):
        safe_load_metadata(pickle.dumps(Evil()))
    root = raw1_copy(tmp_path)
    # an attacker who can write the bucket can also fix up the manifest's checksums
    d2 = root / "step_000000002"
    evil = pickle.dumps(Evil())
    (d2 / ".metadata").write_bytes(evil)
    man = json.loads((d2 / "manifest.json").read_text())
    man["files"][".metadata"].update(record_of(evil))
    (d2 / "manifest.json").write_text(json.dumps(man))
    model, opt = make()
    with pytest.warns(UserWarning, match="refusing to unpickle"):
        assert Checkpointer(str(root)).load(state_of(model, opt, {"step": 0})) == 1
    assert not (tmp_path / "pwned").exists()


def test_mismatched_model_raises_instead_of_skipping(tmp_path):
    root = str(tmp_path / "ck")
    _two_checkpoints(root)
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with pytest.raises(CheckpointMismatch, match="shape mismatch"):
        Checkpointer(root).load({"app": ModelOptimState(other, torch.optim.AdamW(other.parameters()))})


def test_retention_keeps_last_and_every_kth(tmp_path):
    root = tmp_path / "ck"
    model, opt = make()
    (root / "step_000000000").mkdir(parents=True)  # an earlier attempt's interrupted save
    ck = Checkpointer(str(root), keep_last=2, keep_every=4, async_save=True)
    for s in range(1, 10):
        if s == 7:  # garbage of an interrupted save: an uncommitted dir older than what follows
            (root / "step_000000005x").mkdir()  # not a step dir: never touched
            (root / "step_000000006").mkdir(exist_ok=True)
        step(model, opt)
        ck.save(s, state_of(model, opt, {"step": s}))
    ck.close()
    assert ck.steps() == [4, 8, 9]
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert dirs == ["step_000000004", "step_000000005x", "step_000000008", "step_000000009"]
    assert (root / "latest").read_text().strip() == "9"


def test_failed_save_never_deletes_the_only_committed_checkpoint(tmp_path):
    root = tmp_path / "ck"
    model, opt = make()
    ck = Checkpointer(str(root), keep_last=1)
    ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    (root / "step_000000002").write_text("a file where the step dir should go")
    ck.save(2, state_of(model, opt, {"step": 2}))
    with pytest.raises(StorageError, match="step 2"):
        ck.wait()
    ck.save(3, state_of(model, opt, {"step": 3}), blocking=True)
    assert ck.steps() == [3]
    ck.close()


def test_retention_lists_the_root_once_and_still_deletes_what_a_failed_save_left(tmp_path):
    from trainkit.checkpoint._store import CheckpointStore

    store = CheckpointStore(str(tmp_path / "ck"))

    def save(step: int, ok: bool = True) -> None:
        store.put_bytes(store.file_path(step, "data"), b"x")
        if ok:
            store.commit(step, {"data": {"size": 1, "crc32": "0"}}, world_size=1)
        else:
            store.not_committed(step)

    (tmp_path / "ck" / "step_000000000").mkdir(parents=True)  # an earlier process's interrupted save
    save(1)
    assert store.apply_retention(keep_last=1, keep_every=0) == [0]  # the first run lists the root
    save(2, ok=False)
    save(3)
    (tmp_path / "ck" / "step_000000000").mkdir()  # made by someone else mid-run: the root is not listed again
    assert store.apply_retention(keep_last=1, keep_every=0) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest", "step_000000000", "step_000000003"]


def test_failed_save_keeps_previous(tmp_path):
    root = tmp_path / "ck"
    model, opt = make()
    ck = Checkpointer(str(root), keep_last=1)
    ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    (root / "step_000000002").write_text("blocker")
    ck.save(2, state_of(model, opt, {"step": 2}))
    with pytest.raises(StorageError):
        ck.close()
    assert Checkpointer(str(root)).steps() == [1]


def test_async_save_does_not_block_and_snapshots_at_call(tmp_path):
    root = str(tmp_path / "ck")
    big = {"w": torch.randn(16 << 20)}  # 64 MiB
    ref = big["w"].clone()
    ck = Checkpointer(root)
    ck.save(1, {"big": big})
    blocked = ck.last_blocking_s
    big["w"].add_(1.0)  # training goes on while the upload runs
    assert ck.latest_step() in (None, 1)
    ck.wait()
    assert ck.latest_step() == 1
    assert blocked < ck.last_save_s, (blocked, ck.last_save_s)
    target = {"big": {"w": torch.zeros_like(ref)}}
    assert ck.load(target) == 1
    assert torch.equal(target["big"]["w"], ref)  # the values at save() time, not after
    ck.close()


def test_export_roundtrip(tmp_path):
    from safetensors.torch import load_file

    model, opt = make()
    step(model, opt)
    root = str(tmp_path / "ck")
    with Checkpointer(root) as ck:
        ck.save(1, {"app": ModelOptimState(model, opt)})
    url = export_safetensors(model, str(tmp_path / "export" / "model.safetensors"))
    exported = load_file(url)
    assert same(exported, {k: v for k, v in model.state_dict().items()})
    from_ckpt = load_for_export(root, prefix="app.model.")
    assert same(from_ckpt, exported)
    assert load_for_export(f"{root}/step_000000001", prefix="app.model.").keys() == exported.keys()


def test_save_policy_steps_and_seconds():
    now = [0.0]
    p = SavePolicy(every_steps=5, every_seconds=10, clock=lambda: now[0])
    assert [s for s in range(1, 12) if p.due(s)] == [5, 10]
    now[0] = 9.0
    assert not p.due(11)
    now[0] = 20.5
    assert p.due(12) and not p.due(13)
    assert p.due_by_step(15) and not p.due_by_time()  # the two triggers, asked apart
    assert not SavePolicy().due(100)


def test_a_failed_file_in_any_writer_thread_fails_the_save(tmp_path):
    """torch's extra writer threads drop exceptions: the save must fail, not commit a
    checkpoint with items missing, whichever of the two threads meets the bad file."""
    root = tmp_path / "ck"
    model, opt = make()
    for blocked in ("__0_0.safetensors", "__0_1.safetensors"):
        step_dir = root / "step_000000001"
        shutil.rmtree(step_dir, ignore_errors=True)
        (step_dir / blocked).mkdir(parents=True)  # a directory where the data file must go
        with Checkpointer(str(root), io_threads=2, save_attempts=1) as ck:
            with pytest.raises(StorageError, match="DCP save failed"):
                ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
            assert ck.steps() == []


def test_overlapped_staging_holds_the_state_of_the_save_step(tmp_path):
    """With overlap_staging the host copy runs during the next forward/backward; BatchNorm
    statistics change in that forward and parameters in the step after ``staged()``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step(ck=None):
        model(torch.randn(32, 64)).pow(2).mean().backward()
        if ck is not None:
            ck.staged()
        opt.step()
        opt.zero_grad()

    train_step()
    with Checkpointer(str(tmp_path / "ck"), overlap_staging=True) as ck:
        ck.save(1, {"app": ModelOptimState(model, opt)})
        at_save = snapshot(model, opt)
        train_step(ck)
        train_step(ck)
        assert not same(at_save, snapshot(model, opt))
    ck2 = Checkpointer(str(tmp_path / "ck"))
    assert ck2.load({"app": ModelOptimState(model, opt)}) == 1
    assert same(at_save, snapshot(model, opt))


def test_torch_stock_reader_refuses_raw_shards_instead_of_misreading(tmp_path):
    """A trainkit-raw/1 checkpoint (the first format) tags its items, so torch's pickle-based
    reader refuses them instead of misreading raw bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    root = raw1_copy(tmp_path)
    model, opt = make(seed=5)
    sd = {"app": {"model": model.state_dict()}}
    with pytest.raises(CheckpointException) as info:
        dcp.load(sd, storage_reader=FileSystemReader(str(root / "step_000000002")), no_dist=True)
    (failure, _tb), = info.value.failures.values()
    assert "Unknown extension" in str(failure) and "trainkit-raw" in str(failure)


def test_saves_do_not_feed_torchs_unheard_debug_loggers(tmp_path):
    """torch's DCP logger is at DEBUG behind a NullHandler (records built for nobody); a save
    raises it to WARNING, unless someone gave it a real handler."""
    import logging

    from torch.distributed.checkpoint import logger as dcp_logger

    lg = dcp_logger._dcp_logger
    level, handlers = lg.level, list(lg.handlers)
    try:
        lg.setLevel(logging.DEBUG)
        lg.handlers[:] = [logging.NullHandler()]  # as torch leaves it (pytest adds its own)
        with Checkpointer(str(tmp_path / "a")) as ck:
            ck.save(1, {"w": torch.ones(2)}, blocking=True)
        assert lg.level == logging.WARNING
        lg.setLevel(logging.DEBUG)
        lg.addHandler(logging.StreamHandler())
        with Checkpointer(str(tmp_path / "b")) as ck:
            ck.save(1, {"w": torch.ones(2)}, blocking=True)
        assert lg.level == logging.DEBUG
    finally:
        lg.setLevel(level)
        lg.handlers[:] = handlers


def test_both_checkpointers_implement_the_protocol(tmp_path):
    """Run holds a CheckpointerProtocol: each implementation accepts every parameter the
    protocol names, the same way and with the same default; DeepSpeed's refuses options it
    does not have instead of dropping them."""
    import inspect

    from trainkit.checkpoint import CheckpointerProtocol, DCPCheckpointer, DeepSpeedCheckpointer

    assert Checkpointer is DCPCheckpointer
    methods = [n for n in ("save", "staged", "wait", "load", "latest_step", "close")
               if callable(getattr(CheckpointerProtocol, n))]
    assert len(methods) == 6
    for impl in (DCPCheckpointer, DeepSpeedCheckpointer):
        for name in methods:
            want = inspect.signature(getattr(CheckpointerProtocol, name)).parameters
            got = inspect.signature(getattr(impl, name)).parameters
            for p in want.values():
                assert p.name in got, (impl, name, p.name)
                assert (got[p.name].kind, got[p.name].default) == (p.kind, p.default), (impl, name, p.name)
    with DCPCheckpointer(str(tmp_path / "dcp")) as ck:
        assert isinstance(ck, CheckpointerProtocol)
    ds = DeepSpeedCheckpointer(str(tmp_path / "ds"), None, io_threads=4, overlap_staging=True)
    assert isinstance(ds, CheckpointerProtocol) and ds.staged() == 0.0 and ds.latest_step() is None
    ds.close()
    with pytest.raises(TypeError, match="verify"):
        DeepSpeedCheckpointer(str(tmp_path / "ds"), None, verify="size")
    with pytest.raises(ValueError, match="io_threads"):
        DeepSpeedCheckpointer(str(tmp_path / "ds"), None, io_threads=0)


@pytest.mark.parametrize("pointer", ["missing", "unparsable", "names_no_dir", "older", "decommitted"])
def test_restore_falls_back_to_listing_when_latest_leads_nowhere(tmp_path, pointer):
    """``latest`` is a hint: a restore goes through it (a constant number of requests) and
    finds the same step by listing when it is gone, torn, stale or names a step without a
    manifest; a step committed after it (a crash between manifest and pointer) is found too."""
    root = tmp_path / "ck"
    snaps = _two_checkpoints(str(root))
    latest = root / "latest"
    want = 2
    if pointer == "missing":
        latest.unlink()
    elif pointer == "unparsable":
        latest.write_bytes(b"\xff2")
    elif pointer == "names_no_dir":
        latest.write_text("7\n")
    elif pointer == "older":
        latest.write_text("1\n")
    elif pointer == "decommitted":
        (root / "step_000000002" / "manifest.json").rename(root / "step_000000002" / "manifest.corrupt.json")
        want = 1
    model, opt = make(seed=5)
    meta = {"step": -1}
    ck = Checkpointer(str(root))
    if pointer == "decommitted":
        with pytest.warns(UserWarning, match="uncommitted checkpoint dir.*step_000000002"):
            assert ck.load(state_of(model, opt, meta)) == want
    else:
        assert ck.load(state_of(model, opt, meta)) == want
    assert meta["step"] == want and same(snaps[want], snapshot(model, opt))
    assert ck.latest_step() == want
    ck.close()


@pytest.mark.parametrize("mode", ["sync", "async", "overlap"])
def test_cached_save_plans_write_the_same_files_and_replan_when_the_tree_changes(tmp_path, mode, monkeypatch):
    """DCP plans a save once per tree: a second save of the same tree reuses the global plan
    and writes the same files, which load back; a new key, or a dtype that changes at the
    same shape and width (which torch's plan comparison does not see), is planned again."""
    from torch.distributed.checkpoint import default_planner

    planned = []
    real = default_planner.create_default_global_save_plan
    monkeypatch.setattr(default_planner, "create_default_global_save_plan",
                        lambda plans, *a, **k: planned.append(len(plans)) or real(plans, *a, **k))
    root = tmp_path / "ck"
    ck = Checkpointer(str(root), keep_last=10, async_save=mode != "sync", overlap_staging=mode == "overlap")
    model, opt = make()
    snaps = {}
    for s in (1, 2):
        step(model, opt)
        ck.save(s, state_of(model, opt, {"step": s}), blocking=True)
        snaps[s] = snapshot(model, opt)
    assert len(planned) == 1  # the second save was not planned again

    def shards(s):
        return {p.name: p.stat().st_size for p in (root / step_name(s)).iterdir() if is_data_file(p.name)}

    assert shards(2) == shards(1) and len(shards(1)) == 2  # the same shard files (io_threads=2), same sizes
    ck.save(3, {**state_of(model, opt, {"step": 3}), "extra": {"t": torch.arange(6.0)}}, blocking=True)
    assert len(planned) == 2
    ck.save(4, {**state_of(model, opt, {"step": 4}), "extra": {"t": torch.arange(6, dtype=torch.int32)}},
            blocking=True)
    assert len(planned) == 3
    ck.close()
    for s in (1, 2):
        m, o = make(seed=9)
        assert Checkpointer(str(root)).load(state_of(m, o, {"step": 0}), step=s) == s
        assert same(snaps[s], snapshot(m, o))
    for s, want in ((3, torch.arange(6.0)), (4, torch.arange(6, dtype=torch.int32))):
        m, o = make(seed=9)
        extra = {"t": torch.zeros(6, dtype=want.dtype)}
        assert Checkpointer(str(root)).load({**state_of(m, o, {"step": 0}), "extra": extra}, step=s) == s
        assert extra["t"].dtype == want.dtype and torch.equal(extra["t"], want)


def test_a_commit_needs_every_rank_the_save_was_made_by(tmp_path):
    """A save made by 2 ranks whose commit only one answers (its group torn down while the save
    was in flight, so the gather falls back to this process) is not committed."""
    from trainkit.checkpoint._protocol import commit_collectively
    from trainkit.checkpoint._store import CheckpointStore

    store = CheckpointStore(str(tmp_path / "ck"))
    with pytest.raises(StorageError, match="1 of the save's 2 ranks answered"):
        commit_collectively(store, None, 3, {}, None, world_size=2, keep_last=2, keep_every=0, extra={"kind": "dcp"})
    assert store.committed_steps() == []
