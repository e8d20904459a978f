"""Reading a committed checkpoint in one process, with no process group: finding a step under
any run_dir URL, a DCP storage reader for it, and its tensors unsharded.

Every entry point here (the ``python -m trainkit.checkpoint`` CLI, exports, warm starts)
names a checkpoint the same way: a run_dir, its ``checkpoints/`` root or one ``step_*``
directory, optionally with ``@STEP``; a missing run, a missing step and a torn step are
each one :class:`~trainkit.errors.StorageError` line (exit code 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from trainkit import storage
from trainkit.checkpoint._dcp_io import SafeFsspecReader, read_metadata, shard_format
from trainkit.checkpoint._store import CheckpointStore
from trainkit.errors import StorageError
from trainkit.rundir import CHECKPOINTS, MANIFEST, STEP_RE

_AT_STEP = re.compile(r"^(.*)@(\d+)$")


@dataclass(frozen=True)
class Located:
    """One committed step: its store (the checkpointer root), number and parsed manifest."""

    store: CheckpointStore
    step: int
    manifest: dict[str, Any]

    @property
    def url(self) -> str:
        return self.store.step_url(self.step)

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "dcp"))


def split_step(url: str) -> tuple[str, int | None]:
    """``"s3://b/run@1200"`` → ``("s3://b/run", 1200)``; no ``@STEP``: ``(url, None)``."""
    m = _AT_STEP.match(url)
    return (m.group(1), int(m.group(2))) if m else (url, None)


def find_root(url: str) -> CheckpointStore:
    """The checkpointer root ``url`` names: itself, its ``checkpoints/``, or the parent of a
    ``step_*`` directory."""
    url = url.rstrip("/")
    name = url.rsplit("/", 1)[-1]
    if STEP_RE.match(name):
        return CheckpointStore(url[: -len(name) - 1])
    for root in (url, storage.join(url, CHECKPOINTS)):
        store = CheckpointStore(root)
        if store.step_dirs():
            return store
    raise StorageError(f"{url}: no checkpoints here (no step_* directories in it or in its {CHECKPOINTS}/)")


def locate(url: str, step: int | None = None) -> Located:
    """The committed step ``url`` names (``@STEP``, ``step``, a step directory, or else the
    newest committed step)."""
    url, at = split_step(url)
    store = find_root(url)
    name = url.rstrip("/").rsplit("/", 1)[-1]
    m = STEP_RE.match(name)
    named = int(m.group(1)) if m else None
    wanted = [s for s in (step, at, named) if s is not None]
    if len(set(wanted)) > 1:
        raise StorageError(f"{url}: two different steps asked for: {sorted(set(wanted))}")
    if not wanted:
        newest = store.valid_latest()
        if newest is None:
            raise StorageError(f"{store.root}: no committed checkpoint (steps there are torn: no {MANIFEST})")
        wanted = [newest]
    s = wanted[0]
    dirs = store.step_dirs()
    if s not in dirs:
        raise StorageError(f"{store.root}: no step {s} (steps: {_steps_line(sorted(dirs))})")
    try:
        manifest = store.read_manifest(s)
    except FileNotFoundError:
        raise StorageError(f"{store.step_url(s)}: step {s} is torn (no {MANIFEST}: an interrupted save)") from None
    except ValueError as exc:
        raise StorageError(f"{store.step_url(s)}: step {s} is torn ({exc})") from None
    return Located(store, s, manifest)


def _steps_line(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]} ... {steps[-1]} ({len(steps)})"


def dcp_reader(url: str, step: int | None = None, *, verify: bool = True, threads: int = 2) -> SafeFsspecReader:
    """A ``torch.distributed.checkpoint`` storage reader for a committed trainkit checkpoint
    on any fsspec URL: ``dcp.load(state_dict, storage_reader=dcp_reader(url))`` fills a plain
    (or sharded) state dict, resharded to it. ``reader.read_metadata().state_dict_metadata``
    lists every key with its full size and dtype. ``verify``: every file read is CRC-checked
    against the manifest (whole files are read, also for a partial state dict)."""
    loc = locate(url, step)
    if loc.kind != "dcp":
        raise StorageError(f"{loc.url}: a {loc.kind} checkpoint, not a DCP one")
    shards = shard_format(loc.manifest, loc.url)
    files = loc.manifest["files"]
    md, _ = read_metadata(loc.store.fs, loc.store.step_path(loc.step), files, what=loc.url, shards=shards,
                          metadata_record=files.get(".metadata") if verify else None, threads=threads)
    return SafeFsspecReader(loc.url, storage.storage_options(loc.url), expected=files if verify else None,
                            threads=threads, metadata=md, shards=shards)


def load_for_export(ckpt_url: str, prefix: str = "", *, step: int | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a committed checkpoint, unsharded, in this one process.

    ``ckpt_url``: a run_dir, a checkpointer root or a step directory, optionally ``@STEP``
    (default: the newest committed step). ``prefix`` keeps only keys starting with it and
    strips it: ``"app.model."`` gives the plain model weights of
    ``state["app"] = ModelOptimState(...)``; ``""`` gives every tensor (optimizer state
    included). Needs no process group and unpickles nothing.
    """
    import torch.distributed.checkpoint as dcp

    from trainkit.checkpoint.checkpointer import _quiet_dcp

    _quiet_dcp()
    reader = dcp_reader(ckpt_url, step)
    sd: dict[str, torch.Tensor] = {}
    for k, v in reader.read_metadata().state_dict_metadata.items():
        if hasattr(v, "size") and k.startswith(prefix):
            sd[k] = torch.empty(tuple(v.size), dtype=v.properties.dtype)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: t for k, t in sd.items()}
