"""A task whose rank 1 raises on its third step: for testing how a worker failure surfaces."""

import dataclasses

import torch.distributed as dist

from trainkit.tasks import resnet

_calls = 0


def _loss(model, batch):
    global _calls
    _calls += 1
    if dist.get_rank() == 1 and _calls == 3:
        raise ValueError("synthetic failure on rank 1 at its third step")
    return resnet.loss(model, batch)


TASK = dataclasses.replace(resnet.TASK, name="failing", loss=_loss)
