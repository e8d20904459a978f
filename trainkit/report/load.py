"""Reading a run directory (a local path or any fsspec URL) into plain records."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from trainkit import storage
from trainkit.errors import StorageError


@dataclass
class RunLog:
    url: str
    name: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def run_name(url: str) -> str:
    path = storage.local_path(url).rstrip("/")
    return path.rsplit("/", 1)[-1] or path or "run"


def _read(url: str) -> bytes | None:
    fs, path = storage.filesystem(url)

    def get() -> bytes | None:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    return storage.retry(get, what=url)


def parse_jsonl(text: str, what: str) -> list[dict[str, Any]]:
    """Parses JSON lines; a line that is not JSON (a write cut short by a kill) is skipped."""
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        warnings.warn(f"{what}: skipped {bad} unreadable line(s)", stacklevel=2)
    return rows


def load_run(url: str) -> RunLog:
    """``metrics.jsonl``, ``events.jsonl`` and ``summary.json`` of the run at ``url``."""
    log = RunLog(url=url, name=run_name(url))
    metrics = _read(storage.join(url, "metrics.jsonl"))
    events = _read(storage.join(url, "events.jsonl"))
    if metrics is None and events is None:
        raise StorageError(f"{url}: no metrics.jsonl or events.jsonl here; is this a trainkit run_dir?")
    if metrics is not None:
        log.metrics = parse_jsonl(metrics.decode("utf-8", "replace"), storage.join(url, "metrics.jsonl"))
    if events is not None:
        log.events = parse_jsonl(events.decode("utf-8", "replace"), storage.join(url, "events.jsonl"))
    summary = _read(storage.join(url, "summary.json"))
    if summary is not None:
        try:
            loaded = json.loads(summary)
            log.summary = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            warnings.warn(f"{url}/summary.json is not valid JSON; ignored", stacklevel=2)
    return log
