"""Goodput and cost of a long many-node run under failures and preemptions, by simulation.

:mod:`trainkit.report.simulate` writes a run directory step by step, which is right for a
test but not for a week on a thousand nodes. This model plays the same bookkeeping at the
level of events instead: the job trains, saves every ``interval_s`` of training (each save
blocks training for ``save_block_s`` and is durable ``save_total_s`` after it starts),
and each node is lost at random (a Poisson process per node) either

* with notice (a spot preemption: trainkit's watcher sees the notice, the ranks agree on a
  stop step and take an emergency save inside the grace window, so no step is lost; the
  job stops for ``emergency_save_s``), or
* without (a hardware failure, or a kill: everything since the last durable save is lost).

In restart mode (what trainkit does today) any loss stops the whole job, which comes back
after ``restart_s`` (replacement node, process start, restore); a loss during the restart
starts it again. Goodput is training time kept over wall time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Scenario:
    nodes: int = 1024
    hours: float = 7 * 24.0
    notice_per_node_h: float = 0.0   # preemptions with notice, per node-hour
    failure_per_node_h: float = 0.0  # losses without notice, per node-hour
    interval_s: float = math.inf     # training seconds between periodic saves
    save_block_s: float = 0.05
    save_total_s: float = 20.0
    emergency_save_s: float = 20.0
    restart_s: float = 300.0
    node_h_price: float = 32.0


def young_daly(save_cost_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that minimises expected loss, sqrt(2 × save cost × MTBF)
    (Young 1974; Daly 2006's first-order form). Infinite when nothing is lost unannounced."""
    return math.sqrt(2.0 * save_cost_s * mtbf_s) if math.isfinite(mtbf_s) else math.inf


def job_mtbf_s(s: Scenario) -> float:
    """Mean time between unannounced losses of any of the job's nodes."""
    rate = s.nodes * s.failure_per_node_h / 3600.0
    return 1.0 / rate if rate > 0 else math.inf


def simulate(s: Scenario, *, seed: int = 0) -> dict[str, Any]:
    """One run of ``s`` (restart mode): goodput, the split of the wall time, the event
    counts, and the price of the nodes for the wall time."""
    rng = random.Random(seed)
    wall = s.hours * 3600.0
    rate_notice = s.nodes * s.notice_per_node_h / 3600.0
    rate_fail = s.nodes * s.failure_per_node_h / 3600.0
    rate = rate_notice + rate_fail
    t = 0.0
    kept = 0.0        # training seconds that count (durable or still running at the end)
    lost = blocked = emergency = restart = 0.0
    notices = failures = saves = 0
    while t < wall:
        # one attempt: train until the next loss (or the end of the horizon)
        gap = rng.expovariate(rate) if rate > 0 else math.inf
        span = min(gap, wall - t)
        # periodic saves inside the span: each blocks save_block_s of it
        period = s.interval_s + s.save_block_s
        n_saves = int(span // period) if math.isfinite(s.interval_s) else 0
        train = span - n_saves * s.save_block_s
        saves += n_saves
        blocked += n_saves * s.save_block_s
        t += span
        if gap >= wall - (t - span):
            kept += train
            break
        if rng.random() < rate_notice / rate:
            notices += 1
            kept += train
            e = min(s.emergency_save_s, wall - t)
            emergency += e
            t += e
        else:
            failures += 1
            # durable = training up to the last save that finished before the loss
            if n_saves and math.isfinite(s.interval_s):
                last_start = n_saves * period - s.save_block_s
                durable_train = n_saves * s.interval_s
                if span - last_start < s.save_total_s:  # the newest save was not durable yet
                    durable_train -= s.interval_s
                durable_train = max(0.0, durable_train)
            else:
                durable_train = 0.0
            kept += durable_train
            lost += train - durable_train
        # the restart; a loss during it starts it again
        while t < wall:
            nxt = rng.expovariate(rate) if rate > 0 else math.inf
            if nxt >= s.restart_s:
                d = min(s.restart_s, wall - t)
                restart += d
                t += d
                break
            d = min(nxt, wall - t)
            restart += d
            t += d
            if rng.random() < rate_notice / rate:
                notices += 1
            else:
                failures += 1
    cost = s.nodes * s.node_h_price * s.hours
    useful_h = kept / 3600.0
    return {"goodput": kept / wall, "kept_h": useful_h, "lost_h": lost / 3600.0, "blocked_h": blocked / 3600.0,
            "emergency_h": emergency / 3600.0, "restart_h": restart / 3600.0, "notices": notices,
            "failures": failures, "saves": saves, "cost": cost,
            "cost_per_useful_node_h": cost / (useful_h * s.nodes) if useful_h > 0 else math.inf}


def expected(s: Scenario, *, runs: int = 5) -> dict[str, Any]:
    """The mean of ``runs`` simulations (seeds 0..runs-1) of ``s``."""
    sims = [simulate(s, seed=k) for k in range(runs)]
    out = {k: sum(r[k] for r in sims) / runs for k in sims[0] if k != "cost_per_useful_node_h"}
    useful_node_h = out["kept_h"] * s.nodes
    out["cost_per_useful_node_h"] = out["cost"] / useful_node_h if useful_node_h > 0 else math.inf
    return out


def with_interval(s: Scenario, interval_s: float) -> Scenario:
    return replace(s, interval_s=interval_s)
