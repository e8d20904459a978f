"""Reading a run directory (a local path or any fsspec URL) into plain records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainkit import rundir, storage
from trainkit.errors import StorageError


@dataclass
class RunLog:
    url: str
    name: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    # config.yaml: the latest attempt's resolved config (its ``cost`` section prices the run).
    config: dict[str, Any] = field(default_factory=dict)


def run_name(url: str) -> str:
    path = storage.local_path(url).rstrip("/")
    return path.rsplit("/", 1)[-1] or path or "run"


def load_run(url: str) -> RunLog:
    """``metrics.jsonl``, ``events.jsonl``, ``summary.json`` and ``config.yaml`` of the run at
    ``url``; a line cut short by a kill is skipped with a warning."""
    log = RunLog(url=url, name=run_name(url))
    found = False
    for name, records in ((rundir.METRICS, log.metrics), (rundir.EVENTS, log.events)):
        data = rundir.read_log(rundir.path(url, name))
        if data is not None:
            found = True
            records += rundir.parse_jsonl(data.decode("utf-8", "replace"), rundir.path(url, name))
    if not found:
        raise StorageError(f"{url}: no {rundir.METRICS} or {rundir.EVENTS} here; is this a trainkit run_dir?")
    log.summary = rundir.read_summary(url) or {}
    text = rundir.read_bytes(rundir.path(url, rundir.CONFIG))
    if text:
        import yaml

        loaded = yaml.safe_load(text)
        log.config = loaded if isinstance(loaded, dict) else {}
    return log
