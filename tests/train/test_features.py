"""The loop features every strategy shares: accumulation, precision, recomputation, compile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from trainkit import distributed
from trainkit.distributed import free_port

from launching import GPT_TINY, RESNET_TINY, launch, losses
from spawning import spawn

WIDTH, GLOBAL_BATCH, STEPS = 16, 16, 6



def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(GLOBAL_BATCH, WIDTH, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


@distributed.exit_guard()
def _accum_worker(rank: int, world: int, port: int, out: str, accum: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from trainkit import Config, Run

    cfg = Config(run_dir=f"{out}/accum{accum}", seed=3)
    cfg.strategy.name = "ddp"
    cfg.trainer.max_steps, cfg.trainer.grad_accum, cfg.trainer.progress = STEPS, accum, "off"
    cfg.trainer.grad_clip = 0.5
    cfg.checkpoint.enabled = False
    cfg.data.batch_size = GLOBAL_BATCH
    run = Run(cfg)
    model, opt = run.setup(nn.Sequential(nn.Linear(WIDTH, 32), nn.Tanh(), nn.Linear(32, 3)), run.optimizer())
    micro = GLOBAL_BATCH // (world * accum)

    def micro_batches():
        for x, y in _data():
            for m in range(accum):
                lo = (m * world + rank) * micro
                yield x[lo : lo + micro], y[lo : lo + micro]

    for x, y in run.steps(micro_batches()):
        run.backward(nn.functional.cross_entropy(model(x), y))
        run.optimizer_step(opt)
    if rank == 0:
        torch.save(model.module.state_dict(), f"{out}/accum{accum}.pt")
    run.finish()


@pytest.mark.rotate("parity")
def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """Two micro-steps of 4 per rank make the same update as one step of 8 (clipping included)."""
    for accum in (1, 2):
        spawn(_accum_worker, (2, free_port(), str(tmp_path), accum), nprocs=2)
    one, two = torch.load(tmp_path / "accum1.pt"), torch.load(tmp_path / "accum2.pt")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


@pytest.mark.rotate("feature-matrix")
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([*RESNET_TINY, "strategy=ddp", "launcher.workers=2", "trainer.precision=bf16"], id="ddp-bf16"),
        pytest.param([*GPT_TINY, "strategy=fsdp", "launcher.workers=2", "trainer.precision=bf16",
                      "trainer.activation_checkpointing=true"], id="fsdp-bf16-recompute"),
        pytest.param([*GPT_TINY, "strategy=deepspeed", "launcher.workers=2", "trainer.precision=bf16",
                      "trainer.grad_accum=2"], id="zero2-bf16-accum"),
        pytest.param([*RESNET_TINY, "strategy=single", "trainer.precision=fp16"], id="single-fp16-scaler"),
        # torch.compile builds C++ kernels on CPU: ~40 s, so only with --runslow.
        pytest.param([*GPT_TINY, "strategy=single", "trainer.compile=true", "model.n_layer=1"], id="single-compile",
                     marks=pytest.mark.slow),
    ],
)
def test_feature_trains(tmp_path: Path, overrides: list[str]) -> None:
    result = launch(*overrides, "trainer.max_steps=12", f"run_dir={tmp_path / 'run'}", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    curve = losses(tmp_path / "run")
    assert len(curve) == 12 and all(c == c for c in curve)  # no NaN
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
