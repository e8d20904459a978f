"""The on-store layout and commit protocol shared by every trainkit checkpointer.

Layout under ``root`` (any fsspec URL)::

    step_000000100/          one directory per step; shards written by every rank
        __0_0.distcp ...     DCP shards (or DeepSpeed files for DeepSpeedCheckpointer)
        .metadata            DCP metadata (rank 0)
        rank_00000.json      per-rank non-tensor state (JSON), one per rank
        rank_00000.safetensors  per-rank tensors (only when a rank-local entry has tensors)
        manifest.json        written LAST by rank 0: the commit point
    latest                   "100\\n": moved after the manifest

A step directory without a valid ``manifest.json`` does not exist for readers. ``latest`` is a
hint that keeps restore discovery constant in the history: the manifest it names decides,
and when it is missing, unreadable or names no committed step, readers list the root.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import zlib
from collections.abc import Iterator
from typing import Any

from trainkit import storage
from trainkit.errors import StorageError
from trainkit.rundir import LATEST, MANIFEST, STEP_RE, step_dir

log = logging.getLogger("trainkit.checkpoint")

FORMAT = "trainkit-checkpoint/1"
CORRUPT_MANIFEST = "manifest.corrupt.json"
step_name = step_dir


class Crc32:
    """Running CRC-32 of a byte stream, as the manifest records it (8 hex digits).

    CRC-32 detects torn and corrupted files (what a checkpoint must guard against; it is not
    a defence against someone who can write to the bucket) at ~6 GB/s from the standard
    library, so hashing stays far below the store's bandwidth on save and load.
    """

    def __init__(self) -> None:
        self.value = 0
        self.size = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)
        self.size += len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes

    def hexdigest(self) -> str:
        return f"{self.value:08x}"

    def record(self) -> dict[str, Any]:
        return {"size": self.size, "crc32": self.hexdigest()}


def record_of(data: bytes) -> dict[str, Any]:
    """The manifest record (size and CRC-32) of one in-memory object."""
    c = Crc32()
    c.update(data)
    return c.record()


def check_record(name: str, data: bytes, rec: dict[str, Any]) -> None:
    """Raises ValueError when ``data`` is not what the manifest says ``name`` holds."""
    got = record_of(data)
    if got["size"] != rec["size"] or got["crc32"] != rec["crc32"]:
        raise ValueError(f"{name}: checksum mismatch: {got['size']} bytes crc32 {got['crc32']}, "
                         f"manifest says {rec['size']} bytes crc32 {rec['crc32']}")


class CheckpointStore:
    """Listing, manifests, verification and retention for one checkpoint root."""

    def __init__(self, root: str) -> None:
        if not root:
            raise StorageError("checkpoint root is empty")
        self.root = root.rstrip("/")
        self.fs, self.root_path = storage.filesystem(self.root)
        self.root_path = self.root_path.rstrip("/")
        self.local = storage.is_local(self.root)
        # Retention's picture of the root (step -> committed), listed on its first run and kept
        # current by this store's own commits, failed saves, de-commits and deletions, so a save
        # lists the root once per process instead of every retained step dir every time.
        self._known: dict[int, bool] | None = None

    # -- names ---------------------------------------------------------------------------
    def step_url(self, step: int) -> str:
        return storage.join(self.root, step_name(step))

    def step_path(self, step: int) -> str:
        return f"{self.root_path}/{step_name(step)}"

    def file_path(self, step: int, name: str) -> str:
        return f"{self.step_path(step)}/{name}"

    def _url(self, path: str) -> str:
        return storage.join(self.root, path[len(self.root_path):]) if path.startswith(self.root_path) else path

    # -- listing -------------------------------------------------------------------------
    def invalidate(self, path: str | None = None) -> None:
        try:
            self.fs.invalidate_cache(path or self.root_path)
        except Exception:  # noqa: BLE001 - cache only
            pass

    def step_dirs(self) -> dict[int, str]:
        """Every ``step_*`` directory, committed or not."""
        self.invalidate()

        def ls():
            try:
                return self.fs.ls(self.root_path, detail=False)
            except FileNotFoundError:
                return []

        out: dict[int, str] = {}
        for p in storage.retry(ls, what=self.root):
            m = STEP_RE.match(p.rstrip("/").rsplit("/", 1)[-1])
            if m:
                out[int(m.group(1))] = p.rstrip("/")
        return out

    def committed_steps(self) -> list[int]:
        """Steps whose directory holds a manifest (not yet verified), ascending."""
        self.invalidate()
        pattern = f"{self.root_path}/step_*/{MANIFEST}"

        def glob():
            try:
                return self.fs.glob(pattern)
            except FileNotFoundError:
                return []

        steps = []
        for p in storage.retry(glob, what=self._url(pattern)):
            m = STEP_RE.match(p.rstrip("/").rsplit("/", 2)[-2])
            if m:
                steps.append(int(m.group(1)))
        return sorted(set(steps))

    def latest_hint(self) -> int | None:
        """The step ``latest`` names; None when it is absent or does not parse (torn, foreign)."""
        path = f"{self.root_path}/{LATEST}"

        def get() -> bytes | None:
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        raw = storage.retry(get, what=self._url(path))
        try:
            return int(raw.decode().strip()) if raw is not None else None
        except (UnicodeDecodeError, ValueError):
            return None

    def recent_steps(self) -> tuple[list[int], list[int]] | None:
        """Through ``latest``: (committed steps from the one it names on, ascending; uncommitted
        step dirs newer than those), or None when the pointer is absent, unreadable or names no
        committed step (then only a listing of the manifests finds the committed steps).

        A constant number of requests however long the history: GET ``latest``, one listing
        of the root (a page per 1,000 step dirs, which retention keeps few), a HEAD of the named
        manifest and one per newer dir (normally none: a save that crashed between its manifest
        and the pointer left a committed one, an interrupted save an uncommitted one). The
        manifest glob it replaces lists every retained step dir: pages growing with the world.
        """
        hint = self.latest_hint()
        if hint is None:
            return None
        dirs = self.step_dirs()
        if hint not in dirs or not self.is_committed(hint):
            return None
        committed, uncommitted = [hint], []
        for s in sorted(d for d in dirs if d > hint):
            (committed if self.is_committed(s) else uncommitted).append(s)
        return committed, [s for s in uncommitted if s > committed[-1]]

    def newest_committed(self) -> int | None:
        """The newest step with a manifest (not yet verified): through ``latest``, else listed."""
        recent = self.recent_steps()
        if recent is not None:
            return recent[0][-1]
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def is_committed(self, step: int) -> bool:
        path = self.file_path(step, MANIFEST)
        self.invalidate(self.step_path(step))
        return bool(storage.retry(lambda: self.fs.exists(path), what=self._url(path)))

    # -- manifests -----------------------------------------------------------------------
    def read_manifest(self, step: int) -> dict[str, Any]:
        """The parsed manifest; ValueError when it is malformed, FileNotFoundError when absent."""
        path = self.file_path(step, MANIFEST)
        try:
            raw = storage.retry(lambda: self.fs.cat_file(path), what=self._url(path))
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                raise FileNotFoundError(path) from exc
            raise
        try:
            man = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self._url(path)}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("step") != step \
                or not isinstance(man.get("files"), dict):
            raise ValueError(f"{self._url(path)}: not a trainkit manifest for step {step}")
        return man

    def valid_latest(self) -> int | None:
        """Newest step whose manifest is present and parses."""
        recent = self.recent_steps()
        tried = list(reversed(recent[0])) if recent is not None else []

        def listed() -> Iterator[int]:  # only when none of the recent ones parses
            yield from (s for s in reversed(self.committed_steps()) if s not in tried)

        for step in itertools.chain(tried, listed()):
            try:
                self.read_manifest(step)
                return step
            except (ValueError, FileNotFoundError) as exc:
                log.warning("checkpoint step %d ignored: %s", step, exc)
        return None

    def put_bytes(self, path: str, data: bytes) -> None:
        """One object, atomically: a PUT on object stores, write-then-rename on local disks."""
        if self.local:
            tmp = f"{path}.tmp"

            def put():
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)

            storage.retry(put, what=self._url(path))
        else:
            storage.retry(lambda: self.fs.pipe_file(path, data), what=self._url(path))

    def read(self, step: int, name: str, record: dict[str, Any] | None = None) -> bytes:
        """One whole file of the step; checked against its manifest ``record`` when given."""
        path = self.file_path(step, name)
        data = storage.retry(lambda: self.fs.cat_file(path), what=self._url(path))
        if record is not None:
            check_record(name, data, record)
        return data

    def upload(self, step: int, name: str, local: str) -> None:
        """A local file into the step directory (the directory is made first on local stores)."""
        path = self.file_path(step, name)

        def put() -> None:
            if self.local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(local, path)

        storage.retry(put, what=self._url(path))

    def download(self, step: int, name: str, local: str) -> None:
        path = self.file_path(step, name)
        storage.retry(lambda: self.fs.get_file(path, local), what=self._url(path))

    def list_sizes(self, step: int) -> dict[str, int]:
        sp = self.step_path(step)
        self.invalidate(sp)
        entries = storage.retry(lambda: self.fs.ls(sp, detail=True), what=self._url(sp))
        out = {}
        for e in entries:
            if e.get("type") == "directory":
                continue
            out[e["name"].rstrip("/").rsplit("/", 1)[-1]] = int(e.get("size") or 0)
        return out

    def commit(self, step: int, files: dict[str, dict[str, Any]], *, world_size: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0, after every rank has written: check, write the manifest, move ``latest``."""
        listed = self.list_sizes(step)
        problems = []
        for name, rec in files.items():
            if name not in listed:
                problems.append(f"{name} missing")
            elif listed[name] != rec["size"]:
                problems.append(f"{name} is {listed[name]} bytes, writer wrote {rec['size']}")
        if problems:
            raise StorageError(f"{self.step_url(step)}: not committing: {'; '.join(problems)}")
        # leftovers of an earlier, interrupted attempt at this step: not part of this checkpoint
        for name in sorted(set(listed) - set(files) - {MANIFEST}):
            p = self.file_path(step, name)
            try:
                storage.retry(lambda p=p: self.fs.rm_file(p), what=self._url(p))
            except StorageError as exc:
                log.warning("could not remove stale %s: %s", p, exc)
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": world_size,
            "created_unix": time.time(),
            "files": dict(sorted(files.items())),
            **(extra or {}),
        }
        self.put_bytes(self.file_path(step, MANIFEST), json.dumps(manifest, indent=1).encode())
        if self._known is not None:
            self._known[step] = True
        self.put_bytes(f"{self.root_path}/{LATEST}", f"{step}\n".encode())
        return manifest

    def not_committed(self, step: int) -> None:
        """Rank 0 after a save of ``step`` failed: its dir may hold files for retention to delete."""
        if self._known is not None:
            self._known.setdefault(step, False)

    # -- verification --------------------------------------------------------------------
    def verify_sizes(self, step: int, manifest: dict[str, Any]) -> list[str]:
        listed = self.list_sizes(step)
        bad = []
        for name, rec in manifest["files"].items():
            if name not in listed:
                bad.append(f"{name} missing")
            elif listed[name] != rec["size"]:
                bad.append(f"{name}: {listed[name]} bytes, manifest says {rec['size']}")
        return bad

    def quarantine(self, step: int) -> None:
        """De-commits a corrupt step: its manifest becomes ``manifest.corrupt.json``."""
        src, dst = self.file_path(step, MANIFEST), self.file_path(step, CORRUPT_MANIFEST)
        try:
            storage.retry(lambda: self.fs.mv(src, dst), what=self._url(src))
            if self._known is not None:
                self._known[step] = False
            log.warning("checkpoint %s de-committed (manifest renamed to %s)", self.step_url(step), CORRUPT_MANIFEST)
        except StorageError as exc:
            log.warning("could not de-commit %s: %s", self.step_url(step), exc)

    # -- retention -----------------------------------------------------------------------
    def delete_step(self, step: int) -> None:
        sp = self.step_path(step)
        man = self.file_path(step, MANIFEST)

        def rm_manifest():
            try:
                self.fs.rm_file(man)
            except FileNotFoundError:
                pass

        storage.retry(rm_manifest, what=self._url(man))  # de-commit first: a half-deleted step is uncommitted

        def rm_dir():
            try:
                self.fs.rm(sp, recursive=True)
            except FileNotFoundError:
                pass

        storage.retry(rm_dir, what=self._url(sp))
        self.invalidate(sp)
        if self._known is not None:
            self._known.pop(step, None)

    def apply_retention(self, keep_last: int, keep_every: int) -> list[int]:
        """Deletes committed steps beyond ``keep_last`` (sparing every ``keep_every``-th) and
        uncommitted step dirs older than the newest committed step. Returns deleted steps.
        Lists the root on its first run only (see ``_known``)."""
        if self._known is None:
            listed = set(self.committed_steps())
            self._known = {s: s in listed for s in set(self.step_dirs()) | listed}
        committed = sorted(s for s, ok in self._known.items() if ok)
        if not committed:
            return []
        newest = committed[-1]
        keep = set(committed[-max(1, keep_last):]) | {newest}
        if keep_every > 0:
            keep |= {s for s in committed if s % keep_every == 0}
        deleted = []
        for step in sorted(self._known):
            if step >= newest or step in keep:
                continue
            try:
                self.delete_step(step)
                deleted.append(step)
            except StorageError as exc:
                log.warning("retention: could not delete %s: %s", self.step_url(step), exc)
        if deleted:
            log.info("retention: deleted steps %s under %s", deleted, self.root)
        return deleted
