"""Real multi-process (gloo, 2 ranks) checkpoints: DDP and FSDP2, resume and resharding."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

import ckpt_mp
from trainkit.checkpoint import Checkpointer, load_for_export


def same_file(a, b) -> None:
    A, B = load_file(str(a)), load_file(str(b))
    assert A.keys() == B.keys(), A.keys() ^ B.keys()
    diff = [k for k in A if not torch.equal(A[k], B[k])]
    assert not diff, f"differ: {diff[:5]}"


def test_ddp_resume_is_bitwise_on_s3(s3_server, s3_url, tmp_path):
    out = tmp_path / "out"
    common = {"strategy": "ddp", "steps": 6, "out": str(out), "storage": {"s3": s3_server.storage_options}}
    ckpt_mp.run("train", 2, {**common, "root": s3_url, "save_at": [3], "dump_at": [3], "tag": "a"}, tmp_path)
    ckpt_mp.run("train", 2, {**common, "load_root": s3_url, "tag": "b"}, tmp_path)
    assert json.loads((out / "b_stats_rank1.json").read_text())["loaded"] == 3
    same_file(out / "a_saved_3.safetensors", out / "b_loaded_3.safetensors")
    same_file(out / "a_final_6.safetensors", out / "b_final_6.safetensors")  # model, optimizer, RNG, data


def test_fsdp2_resume_and_reshard_2_to_1_to_2(tmp_path):
    out, r2, r1 = tmp_path / "out", str(tmp_path / "ck2"), str(tmp_path / "ck1")
    common = {"strategy": "fsdp2", "steps": 6, "out": str(out)}
    # 2 ranks: save at 3 (async), train on to 6
    ckpt_mp.run("train", 2, {**common, "root": r2, "save_at": [3], "dump_at": [3], "tag": "a"}, tmp_path)
    # 2 ranks resume: bitwise the same run
    ckpt_mp.run("train", 2, {**common, "load_root": r2, "tag": "b"}, tmp_path)
    same_file(out / "a_saved_3.safetensors", out / "b_loaded_3.safetensors")
    same_file(out / "a_final_6.safetensors", out / "b_final_6.safetensors")
    # 2 -> 1: one rank loads the 2-rank checkpoint (model and optimizer resharded), saves at 5
    ckpt_mp.run("train", 1, {**common, "load_root": r2, "root": r1, "save_at": [5], "dump_at": [5], "tag": "c"},
                tmp_path)
    same_file(out / "a_saved_3.safetensors", out / "c_loaded_3.safetensors")
    # 1 -> 2
    ckpt_mp.run("train", 2, {**common, "load_root": r1, "steps": 5, "tag": "d"}, tmp_path)
    same_file(out / "c_saved_5.safetensors", out / "d_loaded_5.safetensors")
    # and a single process with no process group reads the sharded checkpoint for export
    model = load_for_export(r2, prefix="app.model.")
    saved = load_file(str(out / "a_saved_3.safetensors"))
    assert model.keys() == {k[len("model."):] for k in saved if k.startswith("model.")}
    assert all(torch.equal(v, saved["model." + k]) for k, v in model.items())


def test_a_save_whose_peer_died_is_never_committed(tmp_path):
    """Rank 1 dies before step 2's collectives, and rank 0's group is torn down while the
    save is in flight: the save fails (a peer's death is no transient store error to retry),
    and nothing rank 0 wrote alone is committed (a retry without the group once committed
    one rank's half of a checkpoint, which the resumed run could not load)."""
    root, out = str(tmp_path / "ck"), tmp_path / "rank0.json"
    procs = ckpt_mp.start("peer_dies_mid_save", 2, {"root": root, "out": str(out)}, log_dir=tmp_path)
    codes = [p.wait(120) for p in procs]
    log = (tmp_path / "peer_dies_mid_save-rank0.log").read_text()
    assert codes == [0, 3], log
    raised = json.loads(out.read_text())["raised"]
    assert raised and "not committed" in raised, (raised, log)
    assert "retrying" not in log, log
    assert Checkpointer(root, async_save=False).steps() == [1]


def test_a_checkpointer_made_before_the_process_group_says_so(tmp_path):
    """Made before init_process_group, it would save in a world it was not made for: the save
    is not committed, and the error says what to change."""
    code = f"""
import torch, torch.distributed as dist
from trainkit.checkpoint import Checkpointer
ck = Checkpointer({str(tmp_path / 'ck')!r}, async_save=False)
dist.init_process_group("gloo", init_method={('file://' + str(tmp_path / 'rdzv'))!r}, rank=0, world_size=1)
try:
    ck.save(1, {{"w": torch.ones(2)}})
except Exception as exc:
    print("RAISED", exc)
dist.destroy_process_group()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ckpt_mp.REPO))
    assert "RAISED" in out.stdout and "after init_process_group" in out.stdout, out.stdout + out.stderr
    assert Checkpointer(str(tmp_path / "ck"), async_save=False).steps() == []
