"""Micro-batches from DataLoader workers to their main process through a ring of shared slots.

The DataLoader's own hand-over puts every tensor of every batch in a new shared-memory segment:
created in the worker, its file descriptor sent over a socket, mapped and later unmapped by the
main process. For small decoded samples that cost more than building the batch (~3 ms a batch
against ~1.5 ms on a 2-core machine), and the main process paid it alone.

Instead the main process creates a :class:`Ring` of ``slots`` buffers in one shared-memory
segment before its workers start. The worker producing micro-batch ``k`` copies the batch's
tensors into slot ``k % slots`` and sends only where they are (:class:`InRing`: offset, dtype,
shape); the main process copies them out (into pinned memory for a GPU run), then releases the
slot. Variable-shape fields are tensors of whatever shape the batch has and go into the slot
alike; what is not a tensor (lists of str/bytes) and tensors that do not fit in what is left of
the slot (a transform that makes a batch larger than the estimate) go the default way.

**A slot is never written while its batch may still be read.** The worker writing batch ``k``
first waits until the main process has released batch ``k - slots`` (``released``, shared): that
is the previous batch of the same slot, and the main process releases a batch only after copying
it out. The wait cannot deadlock: the main process takes batches in order, and the batch it waits
for has a lower number than every batch whose worker waits. With ``slots > workers *
prefetch_factor + 1`` it is also never felt: the DataLoader asks for at most ``workers *
prefetch_factor`` batches beyond the one it is handing out, so by the time a worker is asked
for batch ``k``, batch ``k - slots`` is long released.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainkit.data.prefetch import map_leaves

ALIGN = 64  # every tensor starts at a multiple of this in its slot (any dtype can view it)
WAIT_MAX = 0.01  # s between two looks at ``released`` while a slot is still in use


@dataclass(frozen=True)
class InRing:
    """A tensor of a batch in the ring: where in its slot, and what it is."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Ring:
    """``slots`` slots of ``slot_bytes`` bytes in shared memory; see the module doc."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots = int(slots)
        self.slot_bytes = -(-max(ALIGN, int(slot_bytes)) // ALIGN) * ALIGN
        self.buf = torch.empty(self.slots * self.slot_bytes, dtype=torch.uint8).share_memory_()
        # released[s]: the last batch of slot s copied out (s - slots: none yet); [slots]: closed
        self.state = torch.tensor([s - self.slots for s in range(self.slots)] + [0], dtype=torch.int64)
        self.state.share_memory_()

    def _bytes(self) -> np.ndarray:
        # numpy copies: single-threaded (torch's copy_ may wake its thread pool for every batch)
        return self.buf.numpy()

    def close(self) -> None:
        """The main process takes no more batches: a worker waiting for a slot stops."""
        self.state[self.slots] = 1

    def put(self, k: int, batch: Any) -> Any | None:
        """In a worker: batch ``k`` with its tensors copied into slot ``k % slots`` and replaced by
        their :class:`InRing` places; None if the ring was closed while waiting for the slot."""
        s = k % self.slots
        state = self.state.numpy()
        delay = 1e-4
        while state[s] < k - self.slots:
            if state[self.slots]:
                return None
            time.sleep(delay)
            delay = min(2 * delay, WAIT_MAX)
        base = s * self.slot_bytes
        used = 0

        def place(v: Any) -> Any:
            nonlocal used
            if not isinstance(v, torch.Tensor) or v.device.type != "cpu":
                return v
            n = v.numel() * v.element_size()
            if used + n > self.slot_bytes:
                return v  # does not fit: the default way
            if n:
                np.copyto(self._bytes()[base + used : base + used + n], _as_bytes(v.contiguous()))
            out = InRing(used, n, v.dtype, tuple(v.shape))
            used += -(-n // ALIGN) * ALIGN
            return out

        return map_leaves(place, batch)

    def take(self, k: int, batch: Any, *, pin: bool = False) -> Any:
        """In the main process: batch ``k`` with its :class:`InRing` tensors copied out of the
        slot (into pinned memory with ``pin``); the slot is then released."""
        s = k % self.slots
        base = s * self.slot_bytes

        def out(v: Any) -> Any:
            if not isinstance(v, InRing):
                return v
            t = torch.empty(v.shape, dtype=v.dtype, pin_memory=pin)
            if v.nbytes:
                np.copyto(_as_bytes(t), self._bytes()[base + v.offset : base + v.offset + v.nbytes])
            return t

        got = map_leaves(out, batch)
        self.state[s] = k
        return got


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a flat uint8 array (any dtype, bfloat16 and bool too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def slot_bytes_for(bytes_per_sample: float, micro: int) -> int:
    """A slot for a micro-batch of ``micro`` samples of about ``bytes_per_sample`` stored bytes
    each: decoded fields take about what they take in a shard; the margin covers the
    alignment of every tensor and fields a little larger than their share of the file."""
    return int(1.25 * bytes_per_sample * micro) + (64 << 10)
