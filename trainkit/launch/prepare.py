"""Checks and set-up done once, in the launching process, before any worker exists.

A missing bucket or credential should cost a second, not a cluster start-up; and the
embedded data set is written once here rather than raced for by every worker.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from trainkit import storage
from trainkit.config import Config
from trainkit.data.source import open_source
from trainkit.errors import StorageError
from trainkit.tasks import TASKS
from trainkit.tasks.base import Task, default_url, store_root, write_data


def check_store(url: str, what: str) -> None:
    """Fails fast, with the key named, when ``url``'s bucket or credentials are unusable."""
    if storage.is_local(url):
        return
    try:
        fs, path = storage.filesystem(url)
        bucket = path.split("/", 1)[0]
        found = storage.retry(lambda: fs.exists(bucket), what=url, attempts=3)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise StorageError(f"{what}={url}: cannot reach the store ({type(exc).__name__}: {exc})") from exc
    if not found:
        raise StorageError(f"{what}={url}: bucket {bucket!r} does not exist or is not accessible")


def prepare(cfg: Config) -> None:
    storage.configure(cfg.storage)
    check_store(cfg.run_dir, "run_dir")
    task = TASKS.get(cfg.task, "task")
    if cfg.data.url:
        check_store(cfg.data.url, "data.url")
        try:  # every reader's layout, so a Parquet or WebDataset folder passes as an index.json does
            open_source(cfg.data.url, None if cfg.data.format == "auto" else cfg.data.format)
        except StorageError as exc:
            raise StorageError(f"data.url={cfg.data.url}: {exc}; write a trainkit dataset with "
                               "`python -m trainkit.data write`") from exc
        return
    prepare_embedded(task, cfg.model)


def prepare_script(cfg: Config, *, named_run_dir: bool) -> None:
    """A script's stores: the run_dir when the command line names it (the script opens its own data)."""
    storage.configure(cfg.storage)
    if named_run_dir:
        check_store(cfg.run_dir, "run_dir")


def prepare_embedded(task: Task, model_cfg: dict[str, Any]) -> str:
    """Writes the task's data set into the embedded store unless it is already there."""
    url = default_url(task, model_cfg)
    root = store_root()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{task.dataset(model_cfg)}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(storage.local_path(url), "index.json")):
            print(f"preparing {task.dataset(model_cfg)} in the embedded store {root}", flush=True)
            write_data(task, model_cfg, url.rsplit("/", 1)[0])
    return url
