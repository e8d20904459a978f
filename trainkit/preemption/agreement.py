"""The one stop/save agreement: every rank stops, and saves on a timer, at the same step.

A notice reaches one rank (a signal, a metadata poll, a drain) and a time-based save is due
by each rank's own clock, so ranks must agree before acting. The agreement runs on its own
CPU (gloo) group and never waits for the training device: the flags a rank raises after
step ``s`` are all-reduced (MAX) in the background while step ``s+1`` runs, and read at the
boundary after it. Every rank therefore acts on the same decision at the same step ``s+1``,
one step after the earliest flag, deterministically, with no host-device synchronisation.

Step-based saves (``every_steps``) need no agreement: every rank computes them alike.
One process has no peers: its own flags count at once.

A launcher can add its own boundary work (:func:`add_boundary_hook`; Ray's reports and drain
probe are such hooks): a hook's ``due()`` is read on every rank at every boundary and travels
in the same all-reduce; ``act()`` then runs on every rank at the one boundary where any rank
said due, so it may itself be a collective, and returns True to stop there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainkit import distributed
from trainkit.preemption.watcher import PreemptionWatcher

# Hooks of this process, taken by each StepAgreement made while they are registered.
_HOOKS: list[Any] = []


def add_boundary_hook(hook: Any) -> None:
    _HOOKS.append(hook)


def remove_boundary_hook(hook: Any) -> None:
    if hook in _HOOKS:
        _HOOKS.remove(hook)


@dataclass(frozen=True)
class Decision:
    stop: bool = False
    save: bool = False


class StepAgreement:
    """``decide(stop, save)`` at every step boundary, on every rank, in the same order.

    Returns the decision that applies at this boundary: the MAX over ranks of the flags
    each raised at the previous boundary. A rank that learns of a stop only from a peer
    gets it recorded in ``watcher`` (reason ``"peer rank ..."``) when one is given.
    """

    def __init__(self, watcher: PreemptionWatcher | None = None) -> None:
        self._group = distributed.new_gloo_group() if distributed.initialized() else None
        self._pending: tuple[Any, torch.Tensor] | None = None
        # Told when a stop comes from a peer, so every rank can say why it stopped.
        self._watcher = watcher
        self._hooks = list(_HOOKS)

    @property
    def lag(self) -> int:
        """Steps between a flag and the boundary that acts on it."""
        return 0 if self._group is None else 1

    def decide(self, stop: bool, save: bool) -> Decision:
        if self._group is None:
            return Decision(self._act([h.due() for h in self._hooks]) or stop, save)
        decision = self._collect()
        flags = torch.tensor([int(stop), int(save), *(int(h.due()) for h in self._hooks)], dtype=torch.int32)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flags)
        return decision

    def _collect(self) -> Decision:
        if self._pending is None:
            return Decision()
        work, flags = self._pending
        self._pending = None
        work.wait()
        stop = self._act([bool(f) for f in flags[2:]])
        decision = Decision(bool(flags[0]) or stop, bool(flags[1]))
        if decision.stop and self._watcher is not None and not self._watcher.requested:
            self._watcher.request("peer rank requested a stop (agreed at a step boundary)")
        return decision

    def _act(self, due: list[bool]) -> bool:
        stop = False
        for hook, wanted in zip(self._hooks, due):
            if wanted:
                stop = bool(hook.act()) or stop
        return stop

    def drain(self) -> None:
        """Waits for the collective in flight (all ranks call it), e.g. before leaving the group."""
        self._collect()
