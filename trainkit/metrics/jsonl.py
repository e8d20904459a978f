"""Append-only JSON-lines logs that live in ``run_dir``, wherever that is.

Object stores cannot append. For a remote ``run_dir`` the log is kept in a local mirror and
uploaded on flush (every few seconds), and it is rolled: once the mirror holds
``part_bytes`` (1 MiB), its records are sealed into ``<name>.parts/NNNNNN.jsonl`` and
``<name>`` starts again empty. An upload therefore costs at most ``part_bytes`` however long
the run is; re-uploading the whole file made every upload grow with the run (a month of
metrics at one record per 10 s is ~110 MB, put again every 10 s: ~14 TB over the month,
docs/benchmarks/scale-2026-12-01.md). Readers join the parts and the tail
(:func:`trainkit.rundir.read_jsonl`); a month is ~110 parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from trainkit import rundir, storage

PART_BYTES = 1 << 20


class JsonlLog:
    def __init__(self, run_dir: str, name: str, *, flush_seconds: float = 5.0, part_bytes: int = PART_BYTES) -> None:
        self.url = storage.join(run_dir, name)
        self.remote = not storage.is_local(run_dir)
        self.part_bytes = int(part_bytes)
        self._parts: list[str] = []
        if self.remote:
            key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
            mirror = os.path.join(os.path.expanduser("~"), ".cache", "trainkit", "mirror", key)
            os.makedirs(mirror, exist_ok=True)
            self.path = os.path.join(mirror, name)
            fs, path = storage.filesystem(self.url)
            if storage.retry(lambda: fs.exists(path), what=self.url):
                storage.retry(lambda: fs.get(path, self.path), what=self.url)
            elif os.path.exists(self.path):
                os.remove(self.path)
            self._parts = rundir.list_parts(self.url)
        else:
            self.path = storage.local_path(self.url)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.flush_seconds = flush_seconds
        self._file = open(self.path, "a", encoding="utf-8")
        self._last_flush = time.monotonic()

    def _tail_text(self) -> str:
        self._file.flush()
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def records(self) -> list[dict[str, Any]]:
        """Every record: the sealed parts (read back from the store), then the mirror."""
        sealed = [rundir.read_bytes(p) or b"" for p in self._parts]
        text = b"".join(sealed).decode("utf-8", "replace") + self._tail_text()
        return rundir.parse_jsonl(text, self.url)

    def keep(self, predicate: Any) -> list[dict[str, Any]]:
        """Drops the records ``predicate`` rejects and returns them (a file is rewritten
        only when some of its records are dropped).

        Used on resume to drop steps that a crashed attempt logged after its last checkpoint:
        they are recomputed, and the log must describe the run, not the attempts. One pass,
        kept lines copied as they are: a long run's log has a line per step, and every
        restart waits for this on rank 0. A line the kill cut short is dropped too.
        The rejected records are the newest ones (steps past a checkpoint), so sealed parts
        are read, newest first, only while everything after them was dropped.
        """
        kept, dropped, torn = self._filter(self._tail_text(), predicate)
        if dropped or torn:
            self._file.close()
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
            self._file = open(self.path, "a", encoding="utf-8")
            self.flush(force=True)
        older: list[dict[str, Any]] = []
        while not kept and self._parts:
            url = self._parts[-1]
            kept, gone, _ = self._filter((rundir.read_bytes(url) or b"").decode("utf-8", "replace"), predicate)
            if not gone:
                break
            older = gone + older
            fs, path = storage.filesystem(url)
            if kept:
                storage.retry(lambda: fs.pipe_file(path, "".join(kept).encode()), what=url)
            else:
                storage.retry(lambda: fs.rm_file(path), what=url)
                self._parts.pop()
        return older + dropped

    def _filter(self, text: str, predicate: Any) -> tuple[list[str], list[dict[str, Any]], bool]:
        kept: list[str] = []
        dropped: list[dict[str, Any]] = []
        torn = False
        for line in text.splitlines(keepends=True):
            if not line.strip():
                continue
            parsed = rundir.parse_jsonl(line, self.url, warn=False)
            if not parsed:
                torn = True
            elif predicate(parsed[0]):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped.append(parsed[0])
        return kept, dropped, torn

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self.flush()

    def flush(self, force: bool = False) -> None:
        self._file.flush()
        now = time.monotonic()
        if self.remote and (force or now - self._last_flush >= self.flush_seconds):
            if os.path.getsize(self.path) >= self.part_bytes:
                self._seal()
            fs, path = storage.filesystem(self.url)
            storage.retry(lambda: fs.put(self.path, path), what=self.url)
        self._last_flush = now

    def _seal(self) -> None:
        """The mirror becomes the next part; the tail starts empty. The part is put before
        the tail is emptied, so a reader that sees the new tail also lists the part."""
        part = storage.join(rundir.parts_of(self.url), rundir.part_name(len(self._parts)))
        fs, path = storage.filesystem(part)
        storage.retry(lambda: fs.put(self.path, path), what=part)
        self._parts.append(part)
        self._file.close()
        self._file = open(self.path, "w", encoding="utf-8")

    def close(self) -> None:
        if not self._file.closed:
            self.flush(force=True)
            self._file.close()
