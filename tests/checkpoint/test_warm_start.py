"""Warm starts (trainkit.checkpoint.warm): from another run's checkpoint across strategies and
world sizes, from a safetensors file and a Hugging Face directory; missing and unexpected keys
in one message."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_mp
from test_checkpoint_local import make, same, seed_all, state_of, step
from trainkit.checkpoint import Checkpointer, CheckpointMismatch
from trainkit.checkpoint.export import write_hf_safetensors
from trainkit.checkpoint.warm import warm_start
from trainkit.errors import StorageError


@pytest.mark.slow  # the run-level test in test_warm_start_run.py covers ddp@2 -> fsdp@3 by default
def test_ddp_on_2_warm_starts_fsdp_on_3_with_its_optimizer(tmp_path):
    out, root = tmp_path / "out", str(tmp_path / "src")
    ckpt_mp.run("train", 2, {"strategy": "ddp", "steps": 3, "root": root, "save_at": [3], "dump_at": [3],
                             "out": str(out), "tag": "a"}, tmp_path)
    ckpt_mp.run("warm", 3, {"strategy": "fsdp2", "source": f"{root}@3", "load_optimizer": True, "out": str(out),
                            "tag": "b"}, tmp_path, timeout=180)
    src, got = load_file(str(out / "a_saved_3.safetensors")), load_file(str(out / "b_warm.safetensors"))
    assert got.keys() == src.keys() and same(got, src)  # model and optimizer moments, resharded 2 -> 3


def test_warm_start_from_a_file_and_a_sharded_hf_dir(tmp_path):
    model, opt = make()
    seed_all(0)
    step(model, opt)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(want, str(tmp_path / "w.safetensors"))
    write_hf_safetensors(want, str(tmp_path / "hf"), max_shard_size=200)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    for source in (str(tmp_path / "w.safetensors"), str(tmp_path / "hf")):
        other, opt2 = make(seed=7)
        assert "4 tensors" in warm_start(other, opt2, source)
        assert same(other.state_dict(), want)
    with pytest.raises(StorageError, match="no optimizer state"):
        warm_start(other, opt2, str(tmp_path / "w.safetensors"), load_optimizer=True)


def test_missing_and_unexpected_keys_in_one_message(tmp_path):
    model, opt = make()
    with Checkpointer(str(tmp_path / "ck")) as ck:
        ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    bigger = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4))
    with pytest.raises(CheckpointMismatch, match=r"missing .*: 3\.bias, 3\.weight; unexpected .*: none"):
        warm_start(bigger, None, str(tmp_path / "ck"))
    with pytest.warns(UserWarning, match=r"missing .*3\.bias"):
        warm_start(bigger, None, str(tmp_path / "ck"), strict=False)
    assert torch.equal(bigger[0].weight, model[0].weight) and torch.equal(bigger[2].bias, model[2].bias)


def test_a_run_dir_with_an_export_warm_starts_from_its_checkpoint(tmp_path):
    model, opt = make()
    with Checkpointer(str(tmp_path / "run" / "checkpoints")) as ck:
        ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    other, _ = make(seed=7)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "run" / "model.safetensors"))
    assert "checkpoints/step_000000001" in warm_start(other, None, str(tmp_path / "run"))
    assert same(other.state_dict(), model.state_dict())
