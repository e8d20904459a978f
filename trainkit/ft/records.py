"""``metrics.jsonl`` and ``events.jsonl`` of a replicas run, written from the groups' ledgers.

The run's logs are single-writer files; here the groups come and go, so the supervisor writes
them for each of its attempts, from what the groups committed (:mod:`trainkit.ft.ledger`), in
the schema the restart mode writes (:mod:`trainkit.rundir`). Goodput, badput and cost
(:func:`trainkit.cost.goodput`, ``python -m trainkit.report``) then read a replicas run as any
other. An attempt here is one supervisor run: losing or replacing a group is not one.

Per metrics record (every ``trainer.log_every`` steps), over the steps it covers:
``step_time_s`` is the wall time from the previous record's commit to this one's, less the
**membership stall**: what the steps did not spend training (the interval less their compute
and all-reduce, a typical quorum each and the saves: tries redone after a loss, a wait for a
heartbeat to expire or for a replacement). That stall is in ``ft_stall_s`` (per step), which the goodput
accounting counts in its ``membership`` bucket. ``data_wait_s`` is the time the
step's rank-0 group spent reading its samples; ``checkpoint_block_s`` the blocking saves.
``ft_groups`` is the mean number of groups per step.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from trainkit import rundir
from trainkit.config import Config
from trainkit.ft.ledger import read
from trainkit.metrics import JsonlLog


def last_recorded(metrics: list[dict[str, Any]], events: list[dict[str, Any]]) -> float:
    """The time of the newest record the run's logs hold (0: none)."""
    times = [r["time"] for r in [*metrics, *events] if isinstance(r.get("time"), (int, float))]
    return max(times, default=0.0)


def record_attempt(cfg: Config, *, began: float | None, outcome: str | None, reason: str = "") -> bool:
    """Writes the attempt whose ledger records are newer than the logs' last record: its
    ``start`` (and ``restore`` when it began from a checkpoint), its metrics records, its
    checkpoints and, with ``outcome`` ``finished`` / ``preempted``, its ending (None: it
    crashed, as a supervisor that was killed). ``began``: when the attempt's supervisor started
    (None: the first group's start). Returns whether there was anything to write."""
    run_dir = cfg.run_dir
    metrics_log = JsonlLog(run_dir, rundir.METRICS)
    events_log = JsonlLog(run_dir, rundir.EVENTS)
    try:
        metrics, events = metrics_log.records(), events_log.records()
        since = last_recorded(metrics, events)
        ledgers = read(run_dir, cfg.ft.groups)
        new = [r for records in ledgers.values() for r in records if float(r.get("time", 0)) > since]
        commits = _final_commits(new)
        if not commits and outcome is None:
            return False
        attempt = len(rundir.of(events, rundir.START))
        starts = [r["time"] for r in new if r.get("event") == "start"]
        began = began if began is not None else min(starts, default=since)
        first = commits[0] if commits else None
        # The attempt began from the checkpoint (a restore later in it, after every group was
        # lost, is not one: its steps are simply committed again).
        restores = [r for r in new if r.get("event") == "healed" and r.get("source") == "checkpoint"
                    and (first is None or r["time"] <= first["time"])]
        loop_start = (first["time"] - first["step_s"]) if first else began
        start_step = first["step"] if first else 0
        if restores:
            restore = restores[0]
            loop_start = max(loop_start, restore["time"])
            done_before = max((int(r["step"]) for r in metrics if isinstance(r.get("step"), int)), default=0)
            dropped = metrics_log.keep(lambda r: int(r.get("step", 0)) <= int(restore["step"]))
            times = [r["time"] for r in dropped if isinstance(r.get("time"), (int, float))]
            events_log.write(rundir.event(
                rundir.RESTORE, min(restore["time"], loop_start) - 1e-6, step=int(restore["step"]),
                recomputed_steps=max(0, done_before - int(restore["step"])), load_s=float(restore.get("load_s", 0.0)),
                dropped_until=max(times, default=None)))
        events_log.write(rundir.event(rundir.START, loop_start, attempt=attempt, step=start_step,
                                      world_size=cfg.ft.groups * cfg.launcher.workers, strategy=cfg.strategy.name,
                                      startup_s=max(0.0, loop_start - began), nodes=1))
        saves = sorted((r for r in new if r.get("event") == "checkpoint"), key=lambda r: r["time"])
        for rec in _metrics(commits, saves, attempt, loop_start, cfg):
            metrics_log.write(rec)
        for save in saves:
            events_log.write(rundir.event(rundir.CHECKPOINT, save["time"], step=int(save["step"]),
                                          blocking_s=float(save["blocking_s"]), blocking=True))
        end = max([float(r["time"]) for r in new] or [loop_start])
        if outcome == "finished":
            events_log.write(rundir.event(rundir.FINISH, end, step=cfg.trainer.max_steps))
        elif outcome == "preempted":
            stop = max((int(r["step"]) for r in new if r.get("event") == "preempted"),
                       default=(commits[-1]["step"] + 1) if commits else start_step)
            events_log.write(rundir.event(rundir.PREEMPTED, end, step=stop, reason=reason or "every group had a notice"))
        return True
    finally:
        metrics_log.close()
        events_log.close()


def _final_commits(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step, the record of replica rank 0 of the step's last commit, in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in sorted((r for r in records if "loss" in r and "rank" in r), key=lambda r: r["time"]):
        if rec["rank"] == 0:
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def _metrics(commits: list[dict[str, Any]], saves: list[dict[str, Any]], attempt: int, loop_start: float,
             cfg: Config) -> list[dict[str, Any]]:
    every, batch, last_step = cfg.trainer.log_every, cfg.data.batch_size, cfg.trainer.max_steps
    out: list[dict[str, Any]] = []
    interval: list[dict[str, Any]] = []
    t_prev = loop_start
    for i, rec in enumerate(commits):
        interval.append(rec)
        step = int(rec["step"]) + 1  # steps done, as the restart mode counts them
        at_end = i + 1 == len(commits)
        if step % every and step != last_step and not at_end:
            continue
        out.append(_record(interval, saves, t_prev, attempt, batch, step))
        t_prev = float(rec["time"])
        interval = []
    return out


def _record(interval: list[Mapping[str, Any]], saves: list[Mapping[str, Any]], t_prev: float, attempt: int,
            batch: int, step: int) -> dict[str, Any]:
    n = len(interval)
    t_end = float(interval[-1]["time"])
    elapsed = max(1e-9, t_end - t_prev)
    block = sum(float(s["blocking_s"]) for s in saves if t_prev < s["time"] <= t_end)
    # What the steps needed: their compute and all-reduce, and a typical quorum each (the lower
    # median: one long wait must not set the norm). The rest of the interval, saves aside, is
    # the stall: tries redone after a loss, a heartbeat expiring, a replacement awaited.
    typical = statistics.median_low(float(r.get("quorum_s", 0.0)) for r in interval)
    needed = sum(float(r["step_s"]) - float(r.get("quorum_s", 0.0)) for r in interval) + n * typical
    stall = max(0.0, elapsed - needed - block)
    data = sum(float(r.get("data_s", 0.0)) for r in interval)
    per_step = (elapsed - stall) / n
    return {
        "step": step,
        "loss": sum(float(r["loss"]) for r in interval) / n,
        "lr": interval[-1].get("lr"),
        "samples_per_s": n * batch / elapsed,
        "step_time_s": per_step,
        "data_wait_s": data / n,
        "checkpoint_block_s": block / n,
        "compute_s": per_step - (data + block) / n,
        "ft_stall_s": stall / n,
        "ft_groups": sum(int(r["participants"]) for r in interval) / n,
        "samples_seen": step * batch,
        "time": t_end,
        "attempt": attempt,
    }


def write_config(cfg: Config) -> None:
    """The resolved config, credentials redacted, as ``config.yaml`` and as this attempt's
    (the report reads the price from it), as the restart mode writes them."""
    from omegaconf import OmegaConf

    from trainkit import storage
    from trainkit.redact import redact

    events = rundir.read_events(cfg.run_dir)
    text = OmegaConf.to_yaml(OmegaConf.create(redact(cfg.to_dict()))).encode()
    for name in (rundir.attempt_config(len(rundir.of(events, rundir.START))), rundir.CONFIG):
        url = rundir.path(cfg.run_dir, name)
        fs, path = storage.filesystem(url)
        if storage.is_local(url):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        storage.retry(lambda: fs.pipe(path, text), what=url)
