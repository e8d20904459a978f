"""The logging window: what the next metrics record averages over.

A record at step ``s`` covers the steps since the previous regular record: their summed loss,
the time spent waiting for data and for checkpoints, and the wall time. The window is part of
the state tree (rank-local), so a run resumed from a save taken between two records logs
the same values at the regular steps as a run that was never interrupted.
"""

from __future__ import annotations

import time
from typing import Any

import torch

TIMERS = ("data_wait_s", "checkpoint_block_s")


class LogWindow:
    def __init__(self, device: torch.device) -> None:
        # A device tensor: adding a loss never waits for the device; read on logging steps.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.timers = dict.fromkeys(TIMERS, 0.0)
        self.since_step = 0
        self._carried_s = 0.0
        self._t0 = time.perf_counter()
        self._read_at: float | None = None
        self._restored = False

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().to(torch.float64)
        self.count += 1

    def resume(self, step: int) -> None:
        """The loop starts at ``step``: a fresh window opens there unless one was restored."""
        if not self._restored:
            self.since_step = step
            self._carried_s = 0.0
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self._carried_s + time.perf_counter() - self._t0

    def read(self, step: int) -> tuple[torch.Tensor, int, dict[str, float], float, int]:
        """(loss sum as a device tensor, losses, timers, seconds, optimizer steps) of the window
        up to ``step``."""
        self._read_at = time.perf_counter()
        elapsed = self._carried_s + self._read_at - self._t0
        return self.loss_sum.clone(), self.count, dict(self.timers), elapsed, step - self.since_step

    def reset(self, step: int) -> None:
        self.loss_sum.zero_()
        self.count = 0
        self.timers = dict.fromkeys(TIMERS, 0.0)
        self.since_step = step
        self._carried_s = 0.0
        # The next window starts where this one was read, so the windows tile the run's time:
        # what a record costs (its collective, which also absorbs the ranks' skew) is in the next.
        self._t0 = self._read_at if self._read_at is not None else time.perf_counter()
        self._read_at = None
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": float(self.loss_sum), "count": self.count, "timers": dict(self.timers),
                "since_step": self.since_step, "elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.fill_(float(state["loss_sum"]))
        self.count = int(state["count"])
        self.timers = {k: float(state["timers"].get(k, 0.0)) for k in TIMERS}
        self.since_step = int(state["since_step"])
        self._carried_s = float(state["elapsed_s"])
        self._restored = True
