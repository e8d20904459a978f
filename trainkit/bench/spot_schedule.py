"""A seeded spot schedule: notice-backed preemptions (Ray node drains) and hard node kills.

Times are seconds after the job is launched. Each kind recurs about every ``every_s``
seconds with a uniform jitter of +-25%, the same seed giving the same schedule, so a figure
can be reproduced and two runs compared on the same disturbances. ``victim`` says which
training worker's node is hit: the i-th Ray Train worker process in process-id order (the
rank order in practice).
"""

from __future__ import annotations

import dataclasses
import random
import re

KINDS = ("drain", "kill")
JITTER = 0.25


@dataclasses.dataclass(frozen=True)
class SpotEvent:
    kind: str
    at_s: float
    victim: int = 0

    def __str__(self) -> str:
        return f"{self.kind}@{self.at_s:g}"


def make_schedule(duration_s: float, *, drain_every_s: float, kill_every_s: float, seed: int = 0,
                  workers: int = 2, first_s: float = 60.0, min_gap_s: float = 45.0,
                  tail_s: float = 60.0) -> list[SpotEvent]:
    """Events in ``[first_s, duration_s - tail_s]``, at least ``min_gap_s`` apart.

    ``min_gap_s`` leaves the job time to resume between events (a job hit again while it
    restarts measures the restart twice); ``tail_s`` lets the last recovery be seen before
    the job ends. ``every_s <= 0`` turns a kind off.
    """
    rng = random.Random(seed)
    last = duration_s - tail_s
    events: list[SpotEvent] = []
    for kind, every in (("drain", drain_every_s), ("kill", kill_every_s)):
        if every <= 0:
            continue
        k = 1
        while True:
            at = k * every + rng.uniform(-JITTER, JITTER) * every
            if at > last:
                break
            events.append(SpotEvent(kind, max(first_s, at), rng.randrange(workers)))
            k += 1
    events.sort(key=lambda e: e.at_s)
    spaced: list[SpotEvent] = []
    for event in events:
        at = max(event.at_s, spaced[-1].at_s + min_gap_s) if spaced else event.at_s
        if at <= last:
            spaced.append(dataclasses.replace(event, at_s=round(at, 1)))
    return spaced


def parse_schedule(text: str) -> list[SpotEvent]:
    """``"drain@60,kill@150"`` (optionally ``kind@seconds:victim``) -> events, sorted."""
    events = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(drain|kill)@(\d+(?:\.\d+)?)(?::(\d+))?", item)
        if not match:
            raise ValueError(f"bad schedule item {item!r}: expected drain@SECONDS or kill@SECONDS[:VICTIM]")
        events.append(SpotEvent(match[1], float(match[2]), int(match[3] or 0)))
    return sorted(events, key=lambda e: e.at_s)


def format_schedule(events: list[SpotEvent]) -> str:
    if not events:
        return "schedule: no events"
    lines = ["schedule (seconds after launch):"]
    lines += [f"  {e.at_s:7.1f}  {e.kind:<5}  worker #{e.victim}'s node" for e in events]
    return "\n".join(lines)
