"""Writes data/raw1: checkpoints in the first shard format (trainkit-raw/1), kept so every
later trainkit proves it still loads them. Run once with the tree of commit 2dfb1ef first on
PYTHONPATH: ``PYTHONPATH=<that tree> python make_raw1.py tests/checkpoint/data/raw1``.
``expected_step<N>.safetensors``: the model and optimizer state saved at step N, keyed as
test_checkpoint_local.snapshot() keys them."""

import random, sys, numpy as np, torch
from safetensors.torch import save_file
from trainkit.checkpoint import Checkpointer, ModelOptimState, RNGState
out = sys.argv[1]
torch.manual_seed(0); random.seed(0); np.random.seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ck = Checkpointer(f"{out}/checkpoints", keep_last=5, async_save=False)
for s in (1, 2):
    x = torch.randn(4, 8)
    model(x).pow(2).mean().backward(); opt.step(); opt.zero_grad()
    ck.save(s, {"app": ModelOptimState(model, opt), "meta": {"step": s}, "rng": RNGState()})
    snap = {f"m.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            snap[f"o.{pid}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    save_file(snap, f"{out}/expected_step{s}.safetensors")
ck.close()
