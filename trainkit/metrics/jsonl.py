"""Append-only JSON-lines logs that live in ``run_dir``, wherever that is.

Object stores cannot append, so for a remote ``run_dir`` the log is kept in a local mirror
and the whole object is rewritten on flush (logs are small; a flush every few seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from trainkit import rundir, storage


class JsonlLog:
    def __init__(self, run_dir: str, name: str, *, flush_seconds: float = 5.0) -> None:
        self.url = storage.join(run_dir, name)
        self.remote = not storage.is_local(run_dir)
        if self.remote:
            key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
            mirror = os.path.join(os.path.expanduser("~"), ".cache", "trainkit", "mirror", key)
            os.makedirs(mirror, exist_ok=True)
            self.path = os.path.join(mirror, name)
            fs, path = storage.filesystem(self.url)
            if fs.exists(path):
                storage.retry(lambda: fs.get(path, self.path), what=self.url)
            elif os.path.exists(self.path):
                os.remove(self.path)
        else:
            self.path = storage.local_path(self.url)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.flush_seconds = flush_seconds
        self._file = open(self.path, "a", encoding="utf-8")
        self._last_flush = time.monotonic()

    def records(self) -> list[dict[str, Any]]:
        self._file.flush()
        with open(self.path, encoding="utf-8") as f:
            return rundir.parse_jsonl(f.read(), self.url)

    def keep(self, predicate: Any) -> list[dict[str, Any]]:
        """Drops the records ``predicate`` rejects and returns them (the file is rewritten
        only when there are some).

        Used on resume to drop steps that a crashed attempt logged after its last checkpoint:
        they are recomputed, and the log must describe the run, not the attempts. One pass,
        kept lines copied as they are: a long run's log has a line per step, and every
        restart waits for this on rank 0. A line the kill cut short is dropped too.
        """
        self._file.flush()
        kept: list[str] = []
        dropped: list[dict[str, Any]] = []
        torn = False
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                parsed = rundir.parse_jsonl(line, self.url, warn=False)
                if not parsed:
                    torn = True
                elif predicate(parsed[0]):
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped.append(parsed[0])
        if dropped or torn:
            self._file.close()
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
            self._file = open(self.path, "a", encoding="utf-8")
            self.flush(force=True)
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self.flush()

    def flush(self, force: bool = False) -> None:
        self._file.flush()
        now = time.monotonic()
        if self.remote and (force or now - self._last_flush >= self.flush_seconds):
            fs, path = storage.filesystem(self.url)
            storage.retry(lambda: fs.put(self.path, path), what=self.url)
        self._last_flush = now

    def close(self) -> None:
        if not self._file.closed:
            self.flush(force=True)
            self._file.close()

