"""What the replica groups committed, and the exactly-once check over it.

Each group appends to ``ft/group-<g>.jsonl`` (:func:`trainkit.rundir.ft_ledger`): its starts,
how it healed (``source``: ``peer`` or ``checkpoint``), one record per committed step (its
replica rank, the number of participants, its chunks of global positions, the step's
global-batch loss) and one per step it had to redo. A step's update is the sum over its
participants' chunks, so the step trained exactly its positions when the chunks recorded for
it by every group that logged it agree with one membership and tile ``[s * B, (s + 1) * B)``.

With several processes per group (``launcher.workers``), rank 0's ledger is the group's and
each other rank ``r`` keeps ``ft/group-<g>-rank-<r>.jsonl`` (:func:`trainkit.rundir.ft_ledger`);
every rank's commit records its ``slices`` of the group's chunks, and a group's commit counts
only when each of its ranks committed the same step in the same incarnation with its slice
of every chunk (:func:`trainkit.ft.loop.shard`), so the slices tile each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainkit import rundir, storage
from trainkit.errors import TrainkitError


def read(run_dir: str, groups: int, rank: int = 0) -> dict[int, list[dict[str, Any]]]:
    """Each group's ledger of rank ``rank`` (0: the group's own)."""
    return {g: rundir.read_jsonl(storage.join(run_dir, rundir.ft_ledger(g, rank))) for g in range(groups)}


@dataclass
class Accounting:
    losses: list[float]
    participants: list[int]
    # Per group: how each incarnation after the first got its state ("peer" / "checkpoint").
    healed: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    redone: int = 0  # steps tried and not committed (redone with the same positions)
    # Steps committed again after a restore from a checkpoint (no live peer): trained twice in
    # the run's history, once in the final model.
    recomputed: list[int] = field(default_factory=list)
    # Per step, the commits of its final membership (what the final model trained).
    final: list[list[dict[str, Any]]] = field(default_factory=list)


def account(run_dir: str, *, groups: int, steps: int, batch: int, workers: int = 1) -> Accounting:
    """Checks that steps ``0 .. steps - 1`` each committed their positions exactly once (the
    last commit of a step wins when a checkpoint restore redid it), and with ``workers``
    processes per group that each rank trained its slice of them; raises TrainkitError with
    the first violation."""
    from trainkit.ft.loop import chunks

    ledgers = read(run_dir, groups)
    ranks_of = {r: read(run_dir, groups, r) for r in range(1, workers)}
    # (step) -> list of commits, in the order the groups wrote them per restore lineage.
    by_step: dict[int, list[dict[str, Any]]] = {}
    healed: dict[int, list[dict[str, Any]]] = {}
    redone = 0
    for g, records in ledgers.items():
        for rec in records:
            if rec.get("event") == "healed":
                healed.setdefault(g, []).append(rec)
            elif rec.get("redo"):
                redone += 1
            elif "loss" in rec:
                by_step.setdefault(int(rec["step"]), []).append(rec)
    extra = sorted(s for s in by_step if not 0 <= s < steps)
    if extra:
        raise TrainkitError(f"steps {extra} committed beyond trainer.max_steps={steps}")
    losses, participants, recomputed, finals = [], [], [], []
    for step in range(steps):
        commits = by_step.get(step)
        if not commits:
            raise TrainkitError(f"step {step} was never committed: positions [{step * batch}, {(step + 1) * batch}) "
                                "not trained")
        lineages = _lineages(commits)
        if len(lineages) > 1:
            recomputed.append(step)
        final = lineages[-1]
        n = final[0]["participants"]
        ranks = [c["rank"] for c in final]
        if len(set(ranks)) != len(ranks):
            raise TrainkitError(f"step {step}: replica rank committed twice in one membership: {final}")
        for c in final:
            want = [list(p) for p in chunks(step, batch, groups, c["rank"], n)]
            if [list(p) for p in c["chunks"]] != want:
                raise TrainkitError(f"step {step}: group {c['group']} trained {c['chunks']}, its share was {want}")
        if len({c["loss"] for c in final}) != 1:
            raise TrainkitError(f"step {step}: groups of one membership disagree on the loss: {final}")
        covered = sorted(p for r in range(n) for p in chunks(step, batch, groups, r, n))
        if covered[0][0] != step * batch or covered[-1][1] != (step + 1) * batch or any(
                a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise TrainkitError(f"step {step}: chunks {covered} do not tile the step's positions")
        for c in final:
            if workers > 1:
                _check_slices(c, [ranks_of[r][c["group"]] for r in range(1, workers)], workers)
        losses.append(float(final[0]["loss"]))
        participants.append(int(n))
        finals.append(final)
    return Accounting(losses, participants, healed, redone, recomputed, finals)


def _check_slices(commit: dict[str, Any], others: list[list[dict[str, Any]]], workers: int) -> None:
    """Every rank of the committing group incarnation trained its slice of each chunk."""
    from trainkit.ft.loop import shard

    step, group = commit["step"], commit["group"]
    for r in range(workers):
        if r == 0:
            rec: dict[str, Any] | None = commit
        else:
            same = [x for x in others[r - 1] if "loss" in x and x["step"] == step
                    and x.get("incarnation") == commit.get("incarnation")]
            # A restore from a checkpoint may redo the step in one incarnation: the nearest in time.
            rec = min(same, key=lambda x: abs(x["time"] - commit["time"]), default=None)
        if rec is None:
            raise TrainkitError(f"step {step}: rank {r} of replica group {group} has no commit of it")
        want = [list(shard(tuple(p), workers, r)) for p in commit["chunks"]]
        if [list(p) for p in rec.get("slices", ())] != want or rec["loss"] != commit["loss"]:
            raise TrainkitError(f"step {step}: rank {r} of replica group {group} trained {rec.get('slices')} "
                                f"(loss {rec['loss']}), its slices were {want} (loss {commit['loss']})")


def _lineages(commits: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A step's commits grouped by membership, oldest first: one group normally; more when a
    restore from a checkpoint redid the step. Commits of one membership land close together."""
    ordered = sorted(commits, key=lambda c: c["time"])
    out: list[list[dict[str, Any]]] = [[ordered[0]]]
    for c in ordered[1:]:
        same = c["participants"] == out[-1][0]["participants"] and c["rank"] not in {x["rank"] for x in out[-1]}
        if same and len(out[-1]) < c["participants"]:
            out[-1].append(c)
        else:
            out.append([c])
    return out
