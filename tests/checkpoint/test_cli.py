"""``python -m trainkit.checkpoint``: list, inspect, verify and export a run's checkpoints with no
process group, on a local disk and on moto's S3; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_checkpoint_local import make, same, seed_all, snapshot, step
from trainkit import storage
from trainkit.checkpoint import Checkpointer, ModelOptimState, RNGState
from trainkit.checkpoint.__main__ import main


def write_run(run_dir: str, steps=(1, 2)) -> dict:
    """A run_dir as ``trainkit.Run`` lays it out (``checkpoints/``, entry ``model_optim``),
    with an LR scheduler; returns what each step saved."""
    model, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seed_all(0)
    saved = {}
    with Checkpointer(storage.join(run_dir, "checkpoints"), keep_last=5) as ck:
        for s in steps:
            step(model, opt)
            sched.step()
            ck.save(s, {"model_optim": ModelOptimState(model, opt), "scheduler": sched,
                        "trainer": {"step": s}, "rng": RNGState()}, blocking=True)
            saved[s] = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "snap": snapshot(model, opt),
                        "opt": opt.state_dict(), "sched": sched.state_dict()}
    return saved


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_inspect_verify(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_run(run)
    (tmp_path / "run" / "checkpoints" / "step_000000003").mkdir()
    (tmp_path / "run" / "checkpoints" / "step_000000003" / "__0_0.safetensors").write_bytes(b"x" * 10)
    code, out, _ = run_cli(capsys, "list", run)
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith("/checkpoints")
    assert [ln.split()[:2] for ln in lines[2:]] == [["1", "committed"], ["2", "committed"], ["3", "torn"]]
    assert lines[2].split()[3] == "1"  # world size

    code, out, _ = run_cli(capsys, "inspect", f"{run}@1")
    assert code == 0 and "step 1, dcp, world size 1" in out
    row = next(ln.split() for ln in out.splitlines() if ln.split()[:1] == ["model_optim.model.0.weight"])
    assert row[1:] == ["16x8", "float32", "1"]
    doc = json.loads(out[out.index("non-tensor state (rank 0):") + len("non-tensor state (rank 0):"):])
    assert doc["state"]["trainer"] == {"step": 1}
    assert doc["state"]["model_optim"]["model"] == "<4 tensors>"
    assert doc["state"]["model_optim"]["optim"]["param_groups"][0]["lr"] == pytest.approx(5e-3)

    code, out, _ = run_cli(capsys, "verify", run)
    assert code == 0 and "all " in out and "match the manifest" in out
    shard = tmp_path / "run" / "checkpoints" / "step_000000002" / "__0_0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "verify", run)
    assert code == 1 and "BAD  __0_0.safetensors" in out and "checksum mismatch" in out


@pytest.mark.parametrize("case", ["no_run", "no_step", "torn_step", "unknown_format", "bad_size"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    run = str(tmp_path / "run")
    write_run(run)
    (tmp_path / "run" / "checkpoints" / "step_000000003").mkdir()
    argv = {
        "no_run": ["list", str(tmp_path / "nothing")],
        "no_step": ["inspect", f"{run}@7"],
        "torn_step": ["export", f"{run}@3", "--to", "torch", "--out", str(tmp_path / "o")],
        "unknown_format": ["export", run, "--to", "onnx", "--out", str(tmp_path / "o")],
        "bad_size": ["export", run, "--to", "safetensors", "--out", str(tmp_path / "o"), "--max-shard-size", "lots"],
    }[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert {"no_run": "no checkpoints", "no_step": "no step 7", "torn_step": "torn",
            "unknown_format": "unknown format", "bad_size": "not a size"}[case] in err


def test_the_module_runs_and_a_bad_command_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainkit.checkpoint", "lsit", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_export_safetensors_round_trips_bit_for_bit(tmp_path, capsys):
    run = str(tmp_path / "run")
    saved = write_run(run)
    out = tmp_path / "hf"
    assert run_cli(capsys, "export", f"{run}@1", "--to", "safetensors", "--out", str(out))[0] == 0
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert same(load_file(str(out / "model.safetensors")), saved[1]["model"])
    # sharded: shards of at most 300 bytes (a bigger tensor gets one of its own) + the index
    out = tmp_path / "hf-sharded"
    assert run_cli(capsys, "export", run, "--to", "safetensors", "--out", str(out), "--max-shard-size", "300B")[0] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    got = {}
    for f in files:
        got.update(load_file(str(out / f)))
    assert same(got, saved[2]["model"]) and set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())


def test_export_torch_round_trips_model_and_optimizer(tmp_path, capsys):
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    run = str(tmp_path / "run")
    saved = write_run(run)
    out = tmp_path / "pt"
    assert run_cli(capsys, "export", run, "--to", "torch", "--out", str(out))[0] == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert same(ckpt["model"], saved[2]["model"])
    model, opt = make(seed=4)
    model.load_state_dict(ckpt["model"])
    set_optimizer_state_dict(model, opt, ckpt["optimizer"])
    assert same(snapshot(model, opt), saved[2]["snap"])


def test_export_accelerate_resumes_an_accelerate_loop(tmp_path, capsys):
    accelerate = pytest.importorskip("accelerate")
    run = str(tmp_path / "run")
    saved = write_run(run)
    out = tmp_path / "acc"
    assert run_cli(capsys, "export", run, "--to", "accelerate", "--out", str(out))[0] == 0
    acc = accelerate.Accelerator(cpu=True)
    try:
        assert acc.num_processes == 1
        model, opt = make(seed=4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        model, opt, sched = acc.prepare(model, opt, sched)
        acc.load_state(str(out))
        assert same(snapshot(model, opt.optimizer), saved[2]["snap"])
        assert sched.scheduler.state_dict() == saved[2]["sched"]
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_cli_over_s3(s3_server, s3_url, tmp_path, capsys):
    saved_options = storage.configured()
    storage.configure({"s3": s3_server.storage_options})
    try:
        saved = write_run(s3_url)
        code, out, _ = run_cli(capsys, "list", s3_url)
        assert code == 0 and [ln.split()[1] for ln in out.splitlines()[2:]] == ["committed", "committed"]
        assert run_cli(capsys, "verify", f"{s3_url}@1")[0] == 0
        assert run_cli(capsys, "export", s3_url, "--to", "safetensors", "--out", f"{s3_url}/export")[0] == 0
        fs = s3_server.filesystem(skip_instance_cache=True)
        local = tmp_path / "model.safetensors"
        fs.get(f"{s3_url.removeprefix('s3://')}/export/model.safetensors", str(local))
        assert same(load_file(str(local)), saved[2]["model"])
    finally:
        storage.configure(saved_options)


def test_the_cli_reads_raw1_checkpoints(tmp_path, capsys):
    from test_checkpoint_local import RAW1, raw1_copy

    root = raw1_copy(tmp_path)
    code, out, _ = run_cli(capsys, "inspect", f"{root}@2")
    assert code == 0 and "shards: trainkit-raw/1" in out and "app.model.0.weight" in out
    assert run_cli(capsys, "verify", str(root))[0] == 0
    assert run_cli(capsys, "export", str(root), "--to", "safetensors", "--out", str(tmp_path / "hf"))[0] == 0
    want = {k[len("m."):]: v for k, v in load_file(str(RAW1 / "expected_step2.safetensors")).items()
            if k.startswith("m.")}
    assert same(load_file(str(tmp_path / "hf" / "model.safetensors")), want)
