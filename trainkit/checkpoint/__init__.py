"""Checkpoints that survive a kill at any instant, on any fsspec URL.

* :class:`CheckpointerProtocol` — what a training loop (``trainkit.Run``) needs from a
  checkpointer; both below implement it, ``Strategy.checkpointer()`` picks one.
* :class:`DCPCheckpointer` (also ``Checkpointer``) — sharded (torch.distributed.checkpoint),
  async, manifest-committed, retention, resharding on load, torn checkpoints skipped.
* :class:`DeepSpeedCheckpointer` — the same commit protocol around DeepSpeed's own engine.
* :class:`CheckpointMismatch` — a checkpoint that does not fit the state being loaded.
* :class:`ModelOptimState`, :class:`RNGState`, :class:`RankLocal`, :func:`rng_state`,
  :func:`set_rng_state` — pieces of the state tree.
* :func:`export_model` — the run's export: Hugging Face safetensors, a sharded model's files
  written by all ranks in parallel; :func:`export_safetensors` (gathered on rank 0),
  :func:`load_for_export` — unsharded weights for serving.
* :func:`dcp_reader`, :func:`locate` — a committed checkpoint on any URL, for ``dcp.load``
  and tools (every shard is a safetensors file; docs/checkpoints.md).
* :class:`SavePolicy` — every N steps / T seconds.
"""

from trainkit.checkpoint._tree import CheckpointMismatch
from trainkit.checkpoint.checkpointer import Checkpointer, DCPCheckpointer
from trainkit.checkpoint.deepspeed import DeepSpeedCheckpointer  # imports deepspeed only when used
from trainkit.checkpoint.export import export_model, export_safetensors
from trainkit.checkpoint.policy import SavePolicy
from trainkit.checkpoint.protocol import CheckpointerProtocol
from trainkit.checkpoint.read import dcp_reader, load_for_export, locate
from trainkit.checkpoint.state import ModelOptimState, RankLocal, RNGState, rng_state, set_rng_state


__all__ = [
    "CheckpointMismatch", "Checkpointer", "CheckpointerProtocol", "DCPCheckpointer", "DeepSpeedCheckpointer",
    "ModelOptimState", "RNGState", "RankLocal", "SavePolicy", "dcp_reader", "export_model", "export_safetensors", "load_for_export", "locate", "rng_state",
    "set_rng_state",
]
