"""Synthetic run directories with known interruptions, for tests, demos and docs.

:func:`simulate_run` plays the bookkeeping of :class:`trainkit.run.Run` on a fake clock: the
same records, the same event order (``restore`` before ``start``; checkpoint blocking time
charged to the next metrics record), the same rewrite of ``metrics.jsonl`` on resume. Nothing
is trained; it only writes what a run with those interruptions would leave behind.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from typing import Any

from trainkit import rundir, storage
from trainkit.cost.goodput import BUCKETS


def simulate_run(
    run_dir: str,
    *,
    max_steps: int = 200,
    log_every: int = 10,
    checkpoint_every: int = 50,
    interruptions: Sequence[tuple[int, str]] = (),
    batch_size: int = 32,
    compute_s: float = 0.08,
    data_wait_s: float = 0.02,
    checkpoint_block_s: float = 0.5,
    startup_s: float = 3.0,
    load_s: float = 0.4,
    downtime_s: float = 20.0,
    jitter: float = 0.1,
    lr: float = 1e-3,
    t0: float = 1_700_000_000.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Writes ``metrics.jsonl``, ``events.jsonl``, ``summary.json`` and ``config.yaml``.

    ``interruptions`` lists ``(step, kind)``: after optimizer step ``step`` the attempt is
    ``"preempt"``-ed (emergency checkpoint, ``preempted`` event, clean exit) or ``"crash"``-ed
    (SIGKILL: no event; the next attempt restores the last checkpoint and recomputes).
    Returns the ground truth: ``useful_s`` (the compute time charged to each step the final
    metrics cover), ``unlogged_steps``, ``wall_s`` (from the first attempt's beginning),
    ``badput_s`` (the clock's own split, bucket by bucket: see :mod:`trainkit.cost.goodput`),
    ``interruption_s``, ``attempts``, ``crashes``, ``preemptions``, ``checkpoints``,
    ``recomputed_steps``.
    """
    rng = random.Random(seed)
    plan = dict(interruptions)
    t = t0
    metrics: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    committed = 0  # step of the latest committed checkpoint
    step = 0
    attempt = 0
    step_times: dict[int, float] = {}  # ground truth: compute charged to each step, final attempt wins
    # Ground truth of the badput buckets, as the clock advances; crashes are seen at their last
    # record (the simulated kill comes right after one), a preemption at its last record.
    truth = dict.fromkeys(BUCKETS, 0.0)  # no replica groups here: "membership" stays 0
    kept_charges: dict[int, tuple[float, float]] = {}  # step -> (data wait, blocking), final attempt wins
    interruption = 0.0
    while True:
        # -- an attempt starts: setup, restore, then the loop ---------------------------------
        began = t
        t += startup_s
        if attempt > 0:
            step = committed
            dropped = [r for r in metrics if r["step"] > step]
            metrics = [r for r in metrics if r["step"] <= step]
            t += load_s
            events.append(rundir.event(rundir.RESTORE, t, step=step, recomputed_steps=len(dropped), load_s=load_s,
                                       dropped_until=max((r["time"] for r in dropped), default=None)))
            t += 0.1
            truth["restore"] += load_s
            interruption += t - began
        truth["startup"] += t - began - (load_s if attempt > 0 else 0.0)
        events.append(rundir.event(rundir.START, t, attempt=attempt, step=step, world_size=1, strategy="ddp",
                                   startup_s=t - began, nodes=1))
        start_t = t
        mark_t, mark_step = t, step
        timers = {"data_wait_s": 0.0, "checkpoint_block_s": 0.0}
        outcome = "finish"
        while step < max_steps:
            wait = data_wait_s * (1 + jitter * rng.uniform(-1, 1))
            comp = compute_s * (1 + jitter * rng.uniform(-1, 1))
            timers["data_wait_s"] += wait
            t += wait + comp
            step += 1
            if step % log_every == 0 or step == max_steps:
                n = step - mark_step
                elapsed = t - mark_t
                per_step = {k: v / n for k, v in timers.items()}
                loss = 4.0 * math.exp(-step / (0.3 * max_steps)) + 0.5 + 0.05 * rng.uniform(-1, 1)
                metrics.append({
                    "step": step, "loss": loss,
                    "lr": lr * min(1.0, step / max(1, max_steps // 10)),
                    "samples_per_s": n * batch_size / elapsed, "step_time_s": elapsed / n,
                    **per_step, "compute_s": elapsed / n - sum(per_step.values()),
                    "mem_peak_bytes": 2**30, "time": t, "attempt": attempt,
                })
                # The record's mean is what each covered step is charged.
                for s in range(mark_step + 1, step + 1):
                    step_times[s] = (elapsed - sum(timers.values())) / n
                    kept_charges[s] = (timers["data_wait_s"] / n, timers["checkpoint_block_s"] / n)
                timers = dict.fromkeys(timers, 0.0)
                mark_t, mark_step = t, step
            kind = plan.pop(step, None) if step < max_steps else None
            if kind == "crash":
                outcome = "crash"
                kept = [r["time"] for r in metrics if r["attempt"] == attempt and r["step"] <= committed]
                truth["recompute"] += t - max(kept, default=start_t)
                interruption += t - max(kept, default=start_t)
                break
            if kind == "preempt":
                last = max(r["time"] for r in metrics if r["attempt"] == attempt) if any(
                    r["attempt"] == attempt for r in metrics) else start_t
                if committed != step:
                    t += checkpoint_block_s
                    events.append(rundir.event(rundir.CHECKPOINT, t, step=step, blocking_s=checkpoint_block_s,
                                               blocking=True))
                    committed = step
                events.append(rundir.event(rundir.PREEMPTED, t, step=step, reason="SIGTERM"))
                truth["emergency_save"] += t - last
                interruption += t - last
                outcome = "preempt"
                break
            if step % checkpoint_every == 0 and step < max_steps:
                t += checkpoint_block_s
                timers["checkpoint_block_s"] += checkpoint_block_s
                events.append(rundir.event(rundir.CHECKPOINT, t, step=step, blocking_s=checkpoint_block_s,
                                           blocking=False))
                committed = step
        if outcome == "finish":
            t += checkpoint_block_s
            events.append(rundir.event(rundir.CHECKPOINT, t, step=step, blocking_s=checkpoint_block_s, blocking=True))
            t += 0.2
            truth["checkpoint_save"] += checkpoint_block_s
            truth["other"] += 0.2  # export and summary
            events.append(rundir.event(rundir.FINISH, t, step=step))
            break
        t += downtime_s
        truth["downtime"] += downtime_s
        interruption += downtime_s
        attempt += 1

    final_steps = {r["step"] for r in metrics}
    assert max(final_steps) == max_steps
    summary = {"run_dir": run_dir, "strategy": "ddp", "world_size": 1, "steps": max_steps,
               "wall_s": t - t0, "loss": metrics[-1]["loss"], "samples_per_s": metrics[-1]["samples_per_s"]}
    fs, root = storage.filesystem(run_dir)
    fs.makedirs(root, exist_ok=True)
    files = {
        rundir.METRICS: "".join(json.dumps(r) + "\n" for r in metrics),
        rundir.EVENTS: "".join(json.dumps(e) + "\n" for e in events),
        rundir.SUMMARY: json.dumps(summary, indent=2),
        rundir.CONFIG: f"seed: {seed}\ntrainer:\n  max_steps: {max_steps}\n  log_every: {log_every}\n",
    }
    for name, text in files.items():
        fs.pipe_file(storage.join(root, name) if root else name, text.encode())
    for wait, block in kept_charges.values():
        truth["data_wait"] += wait
        truth["checkpoint_save"] += block
    kinds = [e["event"] for e in events]
    return {
        "useful_s": sum(step_times.values()),
        # Steps an attempt ran after its last metrics record and before a preemption at a step
        # that is not a multiple of log_every: done once, but in no record.
        "unlogged_steps": max_steps - len(step_times),
        "wall_s": t - t0,
        "badput_s": truth,
        "interruption_s": interruption,
        "attempts": attempt + 1,
        "crashes": sum(1 for _, k in interruptions if k == "crash"),
        "preemptions": kinds.count(rundir.PREEMPTED.name),
        "checkpoints": kinds.count(rundir.CHECKPOINT.name),
        "recomputed_steps": sum(e.get("recomputed_steps", 0) for e in events),
    }
