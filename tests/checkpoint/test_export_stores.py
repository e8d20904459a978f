"""The parallel export and the streaming safetensors warm start on an object store (moto S3):
the spool-and-upload path of each rank's file and byte-range reads of each tensor."""

from __future__ import annotations

import json
import os

import fsspec
import torch

from trainkit import distributed, storage
from trainkit.checkpoint.warm import read_safetensors_weights, warm_start
from trainkit.distributed import free_port
from trainkit.tasks.gpt import GPT, GPTConfig

from spawning import spawn

CFG = dict(n_layer=2, d_model=32, n_head=2, seq_len=16)


@distributed.exit_guard()
def _export_worker(rank: int, world: int, port: int, endpoint: str, url: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from trainkit.checkpoint.export import export_model

    storage.configure({"s3": {"endpoint_url": endpoint}})
    dist.init_process_group("gloo")
    distributed.keep_until_exit(dist.group.WORLD)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    export_model(model, f"{url}/model.safetensors")
    dist.destroy_process_group()


def test_fsdp_ranks_export_to_s3_and_a_model_warm_starts_from_it(s3_server, s3_url) -> None:
    spawn(_export_worker, (2, free_port(), s3_server.endpoint, s3_url), nprocs=2)
    before = storage.configured()
    storage.configure({"s3": {"endpoint_url": s3_server.endpoint}})
    try:
        fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint)
        root = s3_url.removeprefix("s3://")
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root)) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
        assert json.loads(fs.cat_file(f"{root}/model.safetensors.index.json"))["metadata"]["total_size"] > 0
        torch.manual_seed(0)
        want = GPT(GPTConfig(**CFG)).state_dict()
        got = read_safetensors_weights(s3_url)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        torch.manual_seed(1)
        other = GPT(GPTConfig(**CFG))
        assert "29 tensors" in warm_start(other, None, s3_url)
        assert all(torch.equal(other.state_dict()[k], want[k]) for k in want)
    finally:
        storage.configure(before)
