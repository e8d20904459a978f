"""Checkpoints other tools read: every shard a safetensors file named by state-dict key, loaded
by torch's stock ``dcp.load`` (no trainkit import on a local disk; trainkit's one reader on
object stores), and the first format (trainkit-raw/1) still loading next to the new one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckpt_mp
from test_checkpoint_local import RAW1, make, raw1_copy, same, seed_all, snapshot, state_of, step
from trainkit import storage
from trainkit.checkpoint import Checkpointer, ModelOptimState, _codec, dcp_reader, load_for_export
from trainkit.checkpoint._dcp_io import SAFETENSORS, _one_chunk_per_key, is_data_file
from trainkit.errors import StorageError

# What a user runs with nothing but torch: every tensor of a step directory into a plain state dict.
STOCK = """
import sys, torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from safetensors.torch import save_file
step_dir, out = sys.argv[1], sys.argv[2]
md = HuggingFaceStorageReader(step_dir).read_metadata()
sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
dcp.load(sd, storage_reader=HuggingFaceStorageReader(step_dir))
assert not [n for n in sys.modules if n.split(".")[0] == "trainkit"], "trainkit was imported"
save_file(sd, out)
"""


def stock_load(step_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "stock.safetensors"
    proc = subprocess.run([sys.executable, "-c", STOCK, str(step_dir), str(out)], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


def check_shards(step_dir: Path, full: dict[str, torch.Tensor]) -> None:
    """Every shard file opens with safe_open; each tensor is named by its key, and the offsets
    in the file's metadata put it where it sits in the full tensor; together they cover it."""
    covered = {k: 0 for k in full}
    files = sorted(p for p in step_dir.iterdir() if is_data_file(p.name))
    assert files and all(p.suffix == ".safetensors" for p in files)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            sharding = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in f.keys():
                shard = f.get_tensor(key)
                offsets = sharding[key]["saved_offsets"]
                want = full[key]
                for dim, (off, n) in enumerate(zip(offsets, shard.shape)):
                    want = want.narrow(dim, off, n)
                assert torch.equal(shard, want), key
                covered[key] += shard.numel()
    assert covered == {k: v.numel() for k, v in full.items()}


def test_every_shard_is_a_safetensors_file_named_by_key(tmp_path):
    model, opt = make()
    seed_all(0)
    step(model, opt)
    root = tmp_path / "ck"
    with Checkpointer(str(root)) as ck:
        ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    d = root / "step_000000001"
    man = json.loads((d / "manifest.json").read_text())
    assert man["shards"] == SAFETENSORS and not (d / ".metadata").exists()  # no pickle anywhere
    _, full = _codec.split({"app": ModelOptimState(model, opt).state_dict()})
    assert {k for k in full if k.startswith("app.model.")} == {f"app.model.{k}" for k in model.state_dict()}
    check_shards(d, full)
    assert same(full, stock_load(d, tmp_path))


@pytest.mark.parametrize(("strategy", "world", "store"), [
    # one strategy per store by default, in rotation (tests/conftest.py); --runslow runs all six
    pytest.param(strategy, world, store, id=f"{strategy}-{world}-{store}", marks=pytest.mark.rotate(f"stock-dcp-{store}"))
    for store in ("file", "s3") for strategy, world in (("single", 1), ("ddp", 2), ("fsdp2", 2))
])
def test_stock_dcp_load_reads_every_strategy(strategy, world, store, tmp_path, request):
    out = tmp_path / "out"
    args = {"strategy": strategy, "steps": 3, "save_at": [3], "dump_at": [3], "out": str(out), "tag": "a"}
    if store == "s3":
        s3_server, url = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_url")
        args["storage"] = {"s3": s3_server.storage_options}
    else:
        url = str(tmp_path / "ck")
    ckpt_mp.run("train", world, {**args, "root": url}, tmp_path)
    # the worker's own gathered dump of model and optimizer at the save ("model.*", "optim.*")
    want = {f"app.{k}": v for k, v in load_file(str(out / "a_saved_3.safetensors")).items()}
    if store == "file":
        step_dir = Path(url) / "step_000000003"
        got = stock_load(step_dir, tmp_path)  # torch alone, no trainkit import
    else:
        import torch.distributed.checkpoint as dcp

        saved = storage.configured()
        storage.configure({"s3": s3_server.storage_options})
        try:
            reader = dcp_reader(url)  # torch's dcp.load, trainkit's reader for object stores
            got = {k: torch.empty(m.size, dtype=m.properties.dtype)
                   for k, m in reader.read_metadata().state_dict_metadata.items()}
            dcp.load(got, storage_reader=reader, no_dist=True)
        finally:
            storage.configure(saved)
        step_dir = tmp_path / "downloaded"
        fs = s3_server.filesystem(skip_instance_cache=True)
        fs.get(f"{url.removeprefix('s3://')}/step_000000003/", str(step_dir), recursive=True)
    assert got.keys() == want.keys(), got.keys() ^ want.keys()
    assert same(got, want)
    check_shards(step_dir, want)


def test_raw1_checkpoints_still_load_both_ways(tmp_path):
    """A root written by trainkit-raw/1 loads; a run resumed from it writes the new format
    into the same root, and both the new step and the old ones load (and export)."""
    root = raw1_copy(tmp_path)
    expected = {s: load_file(str(RAW1 / f"expected_step{s}.safetensors")) for s in (1, 2)}
    ck = Checkpointer(str(root))
    for s in (1, 2):
        model, opt = make(seed=9)
        meta = {"step": -1}
        assert ck.load(state_of(model, opt, meta), step=s) == s and meta["step"] == s
        assert same(expected[s], snapshot(model, opt))
    model, opt = make(seed=9)
    meta = {"step": -1}
    assert ck.load(state_of(model, opt, meta)) == 2
    step(model, opt)
    meta["step"] = 3
    ck.save(3, state_of(model, opt, meta), blocking=True)
    at3 = snapshot(model, opt)
    ck.close()
    mans = {s: json.loads((root / f"step_00000000{s}" / "manifest.json").read_text()) for s in (2, 3)}
    assert "shards" not in mans[2] and mans[3]["shards"] == SAFETENSORS
    ck = Checkpointer(str(root), keep_last=5)
    for s, want in ((3, at3), (2, expected[2])):
        model, opt = make(seed=9)
        assert ck.load(state_of(model, opt, {"step": -1}), step=s) == s
        assert same(want, snapshot(model, opt))
    ck.close()
    old = load_for_export(f"{root}@2", prefix="app.model.")
    assert same({f"m.{k}": v for k, v in old.items()}, {k: v for k, v in expected[2].items() if k.startswith("m.")})
    assert dcp_reader(str(root), 2).shards == "trainkit-raw/1"


def test_a_newer_shard_format_is_refused_not_decommitted(tmp_path):
    root = tmp_path / "ck"
    model, opt = make()
    with Checkpointer(str(root)) as ck:
        ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    man_path = root / "step_000000001" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["shards"] = "trainkit-safetensors/9"
    man_path.write_text(json.dumps(man))
    with pytest.raises(StorageError, match="newer than this trainkit reads"):
        Checkpointer(str(root)).load(state_of(model, opt, {"step": 0}))
    assert man_path.exists()


def test_no_file_holds_two_shards_of_one_key():
    """safetensors names each tensor once: a rank's second shard of a key goes to another file."""
    def item(fqn):
        return SimpleNamespace(index=SimpleNamespace(fqn=fqn))

    a0, a1, b = item("a"), item("a"), item("b")
    assert _one_chunk_per_key([[a0, b, a1]]) == [[a0, b], [a1]]
    assert _one_chunk_per_key([[]]) == [[]]


def test_an_unknown_dtype_fails_the_save_by_name(tmp_path):
    with Checkpointer(str(tmp_path / "ck"), save_attempts=1) as ck:
        with pytest.raises(StorageError, match="w.*complex128"):
            ck.save(1, {"x": {"w": torch.zeros(2, dtype=torch.complex128)}}, blocking=True)
        assert ck.steps() == []

