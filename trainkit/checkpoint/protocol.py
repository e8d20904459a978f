"""What a training loop needs from a checkpointer, written down once.

``trainkit.Run`` holds a :class:`CheckpointerProtocol`, built by its strategy
(``Strategy.checkpointer(root, **options)``). trainkit ships two implementations, both
keeping the same layout and manifest-last commit protocol (docs/checkpoints.md):
:class:`~trainkit.checkpoint.DCPCheckpointer` (also importable as ``Checkpointer``, the
name the docs use) for torch-native strategies, and
:class:`~trainkit.checkpoint.DeepSpeedCheckpointer` around a DeepSpeed engine. A new
strategy with its own on-disk format implements this protocol and returns it from its
``checkpointer()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CheckpointerProtocol(Protocol):
    """Saves and loads a training-state tree; every rank calls each method, in the same order."""

    #: Steps this checkpointer's own saves committed, in order (a save is durable once listed).
    commits: list[int]
    #: The CPU (gloo) group its collectives run on (None without a process group); Run runs
    #: the warm start and the resume-config check on it, since the default group may be NCCL.
    process_group: Any

    def save(self, step: int, state: Mapping[str, Any], *, blocking: bool = False) -> None:
        """Checkpoints ``state`` as ``step``; returns once the caller may change it again
        (unless :meth:`staged` says otherwise), the upload and commit may go on in the
        background. A step already committed is not rewritten."""

    def staged(self) -> float:
        """Blocks until the in-flight save no longer reads the caller's tensors; returns the
        seconds waited. Called before anything saved is modified (the optimizer step)."""

    def wait(self) -> None:
        """Blocks until the in-flight save is committed; raises its error if it failed."""

    def load(self, state: dict[str, Any], step: int | None = None) -> int | None:
        """Loads ``state`` in place from ``step`` (None: the newest committed step that
        verifies, skipping torn ones); returns the step loaded, or None when there is none."""

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""

    def close(self) -> None:
        """Waits for the in-flight save (raising its error) and releases threads and buffers."""
