"""The collective half of the commit protocol, shared by both checkpointers.

Every rank writes its own files and reports them; rank 0 alone commits (manifest last,
then ``latest``) and the outcome is broadcast, so all ranks raise the same error or none.
On load, the ranks walk the committed steps newest first, agree on each step's verdict and
de-commit (quarantine) the ones that fail, so a torn or corrupt checkpoint costs one
warning and a fall back to the previous one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from trainkit import distributed
from trainkit.checkpoint._store import MANIFEST, CheckpointStore, step_name
from trainkit.checkpoint._tree import rank_json_name, read_rank_state
from trainkit.errors import StorageError

log = logging.getLogger("trainkit.checkpoint")


def agree(problem: str | None, group) -> str | None:
    """Every rank's problem (or None) → the same joined message on all ranks."""
    probs = [p for p in distributed.all_gather_object(problem, group) if p]
    return "; ".join(dict.fromkeys(probs)) if probs else None


def commit_collectively(store: CheckpointStore, group, step: int, records: dict[str, dict[str, Any]],
                        err: str | None, *, world_size: int, keep_last: int, keep_every: int,
                        extra: dict[str, Any], on_commit: Callable[[], None] | None = None) -> None:
    """Every rank, after writing its files: gather (files, error) to rank 0, which writes the
    manifest and moves ``latest`` only when no rank failed and all ``world_size`` ranks the
    save was made by answered (a group torn down under a save in flight leaves one); the
    outcome is broadcast so every rank raises the same error or none. Then rank 0 applies retention (the checkpoint is
    committed already; a failed deletion is only logged)."""
    gathered = distributed.gather_object((records, err), group)
    outcome: str | None = None
    if gathered is not None:
        world = len(gathered)
        errors = [e for _, e in gathered if e]
        if world != world_size:
            errors.append(f"{world} of the save's {world_size} ranks answered")
        if errors:
            outcome = "; ".join(errors)
        else:
            files: dict[str, dict[str, Any]] = {}
            for r, (recs, _) in enumerate(gathered):
                for name, rec in recs.items():
                    files[name] = {**rec, "rank": r}
            try:
                store.commit(step, files, world_size=world,
                             extra={**extra, "rank_files": [rank_json_name(r) for r in range(world)]})
            except Exception as exc:  # noqa: BLE001
                outcome = f"commit: {exc}"
    outcome = distributed.broadcast_object(outcome, group)
    if outcome:
        if gathered is not None:
            store.not_committed(step)
        raise StorageError(f"checkpoint step {step} under {store.root} was not committed: {outcome}")
    if on_commit is not None:
        on_commit()
    if distributed.rank(group) == 0:
        try:
            store.apply_retention(keep_last, keep_every)
        except Exception as exc:  # noqa: BLE001 - the checkpoint is committed anyway
            log.warning("retention after step %d failed: %s", step, exc)


def manifest_agreed(store: CheckpointStore, group, step: int, kind: str
                    ) -> tuple[dict[str, Any] | None, str | None]:
    """Rank 0 reads the step's manifest and compares it with a listing (missing or
    wrong-size files); every rank gets (manifest, None) or (None, the problem)."""
    man, problem = None, None
    if distributed.rank(group) == 0:
        try:
            man = store.read_manifest(step)
            if man.get("kind", kind) != kind:
                problem = f"not a {kind} checkpoint (kind={man.get('kind')!r})"
            else:
                problem = "; ".join(store.verify_sizes(step, man)) or None
        except FileNotFoundError:
            problem = f"no {MANIFEST}"
        except (ValueError, StorageError) as exc:
            problem = str(exc)
    man, problem = distributed.broadcast_object((man, problem), group)
    return (None, problem) if problem else (man, None)


def rank_state_agreed(store: CheckpointStore, group, step: int, manifest: dict[str, Any], *, verify: bool
                      ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor], str | None]:
    """This rank's JSON document and rank-local tensors (rank r reads rank r % the saved world
    size, so a resized run finds one); (doc, tensors, None) on every rank, or the agreed problem."""
    doc, tensors, problem = None, {}, None
    src = distributed.rank(group) % int(manifest.get("world_size") or 1)
    try:
        doc, tensors = read_rank_state(store, step, manifest, src, verify=verify)
    except Exception as exc:  # noqa: BLE001 - agreed below
        problem = f"rank state {rank_json_name(src)}: {type(exc).__name__}: {exc}"
    problem = agree(problem, group)
    return (None, {}, problem) if problem else (doc, tensors, None)


def _candidates(store: CheckpointStore, step: int | None, through_latest: bool, warned: set[int]
                ) -> tuple[list[int], list[int], bool]:
    """Rank 0: (steps to try, newest first; the committed steps seen, ascending; whether they
    were listed). Through ``latest`` when it names a committed step (a constant number of
    requests); otherwise, or once those all failed, by listing every manifest."""
    if step is not None:
        return [int(step)], store.committed_steps(), True
    recent = store.recent_steps() if through_latest else None
    if recent is not None:
        committed, torn = recent
    else:
        committed = store.committed_steps()
        newest = committed[-1] if committed else -1
        torn = sorted(s for s in store.step_dirs() if s > newest)
    torn = [s for s in torn if s not in warned]
    if torn:
        warned.update(torn)
        _warn(f"ignoring uncommitted checkpoint dir(s) {[step_name(s) for s in torn]} under {store.root} "
              "(no manifest: an interrupted save)")
    return list(reversed(committed)), committed, recent is None


def load_newest(store: CheckpointStore, group, step: int | None,
                try_load: Callable[[int], str | None]) -> tuple[int | None, list[int]]:
    """Tries ``step`` (or the committed steps, newest first) with ``try_load``, which returns
    None on success or the agreed problem. Returns (step loaded or None, the committed steps
    seen). A named ``step`` that fails raises; otherwise a failing step is warned about,
    de-committed, and the next older one tried: first those ``latest`` leads to, then, if
    none loads (or the pointer leads nowhere), every listed one not tried yet."""
    tried: set[int] = set()
    warned: set[int] = set()  # rank 0's: uncommitted dirs already warned about, quarantined ones too
    seen: set[int] = set()
    for through_latest in ((True, False) if step is None else (False,)):
        found = _candidates(store, step, through_latest, warned) if distributed.rank(group) == 0 else None
        cands, committed, listed = distributed.broadcast_object(found, group)
        seen.update(committed)
        for s in cands:
            if s in tried:
                continue
            tried.add(s)
            problem = try_load(s)
            if problem is None:
                log.info("loaded checkpoint step %d from %s", s, store.root)
                return s, sorted(seen)
            msg = f"checkpoint {store.step_url(s)} skipped: {problem}"
            if step is not None:
                raise StorageError(msg)
            _warn(msg)
            if distributed.rank(group) == 0:
                store.quarantine(s)
                warned.add(s)
            distributed.barrier(group)
        if listed:
            break
    return None, sorted(seen)


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)
