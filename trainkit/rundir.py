"""The run directory: what lives in ``run_dir``, the events a run records, and how to read them.

This is the one place that names the files of a run and the fields of its events. Writers
(``Run``, the launchers, the sweep) and readers (``report``, ``chaos``, ``bench``) import it,
so a new event or file is added here once and every tool sees the same schema::

    <run_dir>/
        config.yaml              the resolved config of the latest attempt (credentials redacted)
        configs/attempt-N.yaml   every attempt's resolved config
        metrics.jsonl            one record per logged step
        events.jsonl             one record per event below
        *.jsonl.parts/           on object stores: a log's sealed parts (read_jsonl joins them)
        summary.json             written when the run finishes
        model.safetensors        the exported weights (a sharded model: model-0000k-of-0000n
                                 .safetensors + model.safetensors.index.json, Hugging Face's layout)
        exports/step_<9+ digits>/   the same, every checkpoint.export_every_steps
        tensorboard/             TensorBoard event files
        report/                  python -m trainkit.report's tables and plots
        checkpoints/step_<9+ digits>/manifest.json   written last: the commit point
        checkpoints/latest       the last committed step (a hint; manifests are the truth)
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

from trainkit import storage

CONFIG = "config.yaml"
CONFIGS = "configs"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
EXPORT = "model.safetensors"
EXPORTS = "exports"
TENSORBOARD = "tensorboard"
REPORT = "report"
CHECKPOINTS = "checkpoints"
# Inside CHECKPOINTS (trainkit.checkpoint keeps the commit protocol; these are its names).
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_PREFIX = "step_"
STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{9,}})$")


def path(run_dir: str, name: str) -> str:
    """The URL of ``name`` (one of the constants above) inside ``run_dir``."""
    return storage.join(run_dir, name)


def step_dir(step: int) -> str:
    """A checkpoint's directory name inside ``checkpoints/``."""
    return f"{STEP_PREFIX}{step:09d}"


def step_export(step: int) -> str:
    """Where the periodic export of ``step`` puts its single-file name (shards go beside it)."""
    return f"{EXPORTS}/{step_dir(step)}/{EXPORT}"


def attempt_config(attempt: int) -> str:
    return f"{CONFIGS}/attempt-{attempt}.yaml"


# ft.mode=replicas: what each replica group committed, step by step (trainkit.ft.ledger).
FT_LEDGERS = "ft"


def ft_ledger(group: int, rank: int = 0) -> str:
    """Rank 0's ledger is the group's; with several processes per group each other rank keeps its own."""
    return f"{FT_LEDGERS}/group-{group}.jsonl" if rank == 0 else f"{FT_LEDGERS}/group-{group}-rank-{rank}.jsonl"


@dataclass(frozen=True)
class Event:
    """An event kind and the fields (besides ``event`` and ``time``) each record carries;
    ``optional`` fields came later, so readers must do without them (older run dirs, other
    writers)."""

    name: str
    fields: tuple[str, ...]
    doc: str
    optional: tuple[str, ...] = ()


# Every record also has ``event`` (the name) and ``time`` (Unix seconds).
START = Event("start", ("attempt", "step", "world_size", "strategy"),
              "an attempt began its loop at ``step``; attempts count from 0; ``startup_s``: since "
              "its ``Run`` was made (process group, model, data, restore); ``nodes``: machines",
              optional=("startup_s", "nodes"))
RESTORE = Event("restore", ("step", "recomputed_steps"),
                "a checkpoint was loaded; ``recomputed_steps`` were logged by the previous "
                "attempt after it and will run again; ``load_s``: the load took this long; "
                "``dropped_until``: time of the last record it dropped (None: none)",
                optional=("load_s", "dropped_until"))
CHECKPOINT = Event("checkpoint", ("step", "blocking_s", "blocking"),
                   "a save was taken; training was blocked for ``blocking_s``")
CHECKPOINT_COMMITTED = Event("checkpoint_committed", ("step", "at_step"),
                             "the save of ``step`` became durable while training was at ``at_step``")
GRACE_CHECK = Event("grace_check", ("step", "save_s", "grace_s", "fits", "source"),
                    "what a save takes (``source``: startup from the last attempt's, save, "
                    "emergency) against preemption.grace_seconds, the time from notice to forced stop")
PREEMPTED = Event("preempted", ("step", "reason"),
                  "the ranks stopped at ``step`` after a notice; the process exits 75")
FINISH = Event("finish", ("step",), "the run reached max_steps; its summary.json follows")
WARM_START = Event("warm_start", ("source", "load_optimizer"),
                   "a run without a checkpoint of its own loaded checkpoint.load_from")

EVENTS_SCHEMA: dict[str, Event] = {
    e.name: e for e in (START, RESTORE, CHECKPOINT, CHECKPOINT_COMMITTED, GRACE_CHECK, PREEMPTED, FINISH,
    WARM_START)
}
# An attempt ends with one of these (a crash leaves none).
TERMINAL = (PREEMPTED.name, FINISH.name)


def event(kind: Event, time: float, **fields: Any) -> dict[str, Any]:
    """An events.jsonl record; rejects fields the schema does not define for ``kind``."""
    unknown = set(fields) - set(kind.fields) - set(kind.optional)
    missing = set(kind.fields) - set(fields)
    if unknown or missing:
        raise ValueError(f"event {kind.name}: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
    return {"event": kind.name, "time": time, **fields}


def of(records: list[dict[str, Any]], kind: Event) -> list[dict[str, Any]]:
    """The records of one event kind, in order."""
    return [r for r in records if r.get("event") == kind.name]


def parse_jsonl(text: str, what: str = "", *, warn: bool = True) -> list[dict[str, Any]]:
    """JSON-lines records; a line that is not a JSON object (a write cut short) is skipped."""
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad and warn:
        warnings.warn(f"{what or 'jsonl'}: skipped {bad} unreadable line(s)", stacklevel=2)
    return rows


def read_bytes(url: str) -> bytes | None:
    """The object at ``url``, or None when there is none (transient errors retried)."""
    fs, p = storage.filesystem(url)

    def get() -> bytes | None:
        try:
            return fs.cat_file(p)
        except FileNotFoundError:
            return None

    return storage.retry(get, what=url)


def parts_of(url: str) -> str:
    """Where a JSON-lines log on an object store keeps its sealed parts: ``<url>.parts/``,
    ``000000.jsonl``, ``000001.jsonl``, ... in order; ``url`` itself holds the records after
    the last part (see :class:`trainkit.metrics.JsonlLog`)."""
    return f"{url}.parts"


def part_name(seq: int) -> str:
    return f"{seq:06d}.jsonl"


def list_parts(url: str) -> list[str]:
    """The URLs of the sealed parts of the log at ``url``, in order ([] when there are none)."""
    fs, p = storage.filesystem(parts_of(url))

    def ls() -> list[str]:
        try:
            fs.invalidate_cache(p)
            return fs.ls(p, detail=False)
        except FileNotFoundError:
            return []

    names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in storage.retry(ls, what=parts_of(url)))
    return [storage.join(parts_of(url), n) for n in names if n.endswith(".jsonl")]


def read_log(url: str) -> bytes | None:
    """The whole JSON-lines log at ``url``: its sealed parts, then the open tail (None when
    there is neither). A part sealed while this reads is noticed (the listing is taken
    again after the tail) and the read repeated, so no record is missed or read twice."""
    for _ in range(10):
        parts = list_parts(url)
        tail = read_bytes(url)
        if list_parts(url) == parts:
            break
    if not parts:
        return tail
    chunks = [read_bytes(p) or b"" for p in parts]
    return b"".join(chunks) + (tail or b"")


def read_jsonl(url: str, *, warn: bool = False) -> list[dict[str, Any]]:
    """The records of the JSON-lines log at ``url``, sealed parts included ([] when absent)."""
    data = read_log(url)
    return [] if data is None else parse_jsonl(data.decode("utf-8", "replace"), url, warn=warn)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    return read_jsonl(path(run_dir, METRICS))


def read_events(run_dir: str) -> list[dict[str, Any]]:
    return read_jsonl(path(run_dir, EVENTS))


def read_summary(run_dir: str) -> dict[str, Any] | None:
    """``summary.json`` (None when the run has not finished or the file is unreadable)."""
    data = read_bytes(path(run_dir, SUMMARY))
    if data is None:
        return None
    try:
        loaded = json.loads(data)
    except ValueError:
        warnings.warn(f"{path(run_dir, SUMMARY)} is not valid JSON; ignored", stacklevel=2)
        return None
    return loaded if isinstance(loaded, dict) else None
