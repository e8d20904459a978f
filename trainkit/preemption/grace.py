"""``preemption.grace_seconds``: the time from a notice to the forced stop.

An emergency save that outlasts it is cut short by the cloud (AWS gives 120 s, GCP 30 s),
and the run resumes from the save before. So the run measures what a save takes, at
start-up (from the previous attempt's record), after every save and at the emergency save,
records each figure against the grace period in events (``grace_check``), and warns once
when a save does not fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from trainkit import rundir

class GraceCheck:
    def __init__(self, grace_s: float, event: Callable[..., None], say: Callable[[str], None]) -> None:
        self.grace_s = float(grace_s)
        self._event = event
        self._say = say
        self._warned = False
        self._started: dict[int, float] = {}

    def from_history(self, events: list[dict[str, Any]]) -> None:
        """Checks the last save time a previous attempt measured, before this one trains."""
        past = rundir.of(events, rundir.GRACE_CHECK)
        if past:
            last = past[-1]
            self.check(int(last.get("step", 0)), float(last["save_s"]), "startup")

    def started(self, step: int, t0: float) -> None:
        self._started[step] = t0

    def committed(self, step: int, at_step: int) -> None:
        """A save became durable; seen at a step boundary, so its time is exact to one step."""
        t0 = self._started.pop(step, None)
        if t0 is not None:
            self.check(step, time.perf_counter() - t0, "save")

    def emergency(self, step: int, seconds: float) -> None:
        self.check(step, seconds, "emergency")

    def check(self, step: int, save_s: float, source: str) -> None:
        fits = save_s <= self.grace_s
        self._event(rundir.GRACE_CHECK, step=step, save_s=round(save_s, 4), grace_s=self.grace_s, fits=fits,
                    source=source)
        if not fits and not self._warned:
            self._warned = True
            text = (f"warning: a checkpoint save took {save_s:.1f} s, longer than preemption.grace_seconds="
                    f"{self.grace_s:g}: an emergency save would be cut short (set grace_seconds to your "
                    "cloud's notice, e.g. AWS 120, GCP 30; or save less state, or raise checkpoint.io_threads)")
            self._say(text)
