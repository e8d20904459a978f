"""Per-node local cache of whole shards, bounded in bytes, evicting by the known order.

Layout of one cache directory (one per dataset URL)::

    .lock                                  flock'd around every admission/eviction decision
    <shard name>.<sha256[:16]>             complete, verified shards (read-only after rename)
    .tmp.<shard name>.<bytes>.<pid>.<rand> downloads in flight; the size in the name reserves
                                           space, the pid lets anyone delete a dead process's
                                           leftovers

A shard enters the cache only as a temp file that is downloaded, size- and checksum-checked,
then atomically renamed, so a crashed attempt (or a concurrent one) can never leave a
half-written file under a final name. Any number of processes (loader workers, ranks of one
node) may share a directory: decisions are made under the flock, downloads outside it, and a
process that finds another one fetching the same shard waits for its rename.

Eviction is Belady's rule with the real future: every process knows the epoch order, so the
shard to evict is the one whose next use is furthest away (or never, e.g. an old version).
A prefetch is admitted only if it evicts shards needed *later* than itself; a demand fetch
(needed now) may evict anything complete. The bound counts complete files plus reserved
in-flight downloads and is never exceeded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np

from trainkit import storage
from trainkit.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

_PRESENT, _BUSY, _DEFERRED = "present", "busy", "deferred"
FAST_CRC32C = google_crc32c.implementation == "c"  # the pure-Python fallback runs at a few MB/s


@dataclass(frozen=True)
class ShardInfo:
    name: str
    url: str
    num_samples: int
    bytes: int
    sha256: str  # "" where the format has no checksum (Parquet): the size is checked, then the reader's own
    tag: str = ""  # names the file's version in the cache where there is no sha256 (size, mtime/ETag)
    crc32c: str = ""  # what a download is checked against when present (datasets written since 2026-12)

    @property
    def local_name(self) -> str:
        return f"{self.name}.{(self.sha256 or self.tag)[:16]}"

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, expected hex digest) a download is checked against, or None (size only).

        CRC32C where the index has it and its C implementation is installed: ~9 GB/s against
        sha256's ~1 GB/s, which on a 2-core machine was a fifth of the CPU a shuffled epoch of
        small samples took. It catches the corruption a transfer or a disk causes (the object
        stores check uploads with the same CRC); sha256, kept in the index, still names the
        cached file and is what older datasets are checked against."""
        if self.crc32c and FAST_CRC32C:
            return "crc32c", self.crc32c
        return ("sha256", self.sha256) if self.sha256 else None


def default_cache_root() -> Path:
    env = os.environ.get("TRAINKIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trainkit" / "data"


def cache_dir_for(url: str, cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def crc32c_hex(data: bytes) -> str:
    return f"{google_crc32c.value(data):08x}"


def checksums(data: bytes) -> dict[str, str]:
    """What an index records of a shard's bytes: sha256 (its name in the cache, and what
    readers without CRC32C's C implementation check) and CRC32C (what downloads are checked
    against), the latter only where it is fast to compute."""
    out = {"sha256": hashlib.sha256(data).hexdigest()}
    if FAST_CRC32C:
        out["crc32c"] = crc32c_hex(data)
    return out


def digest_of(algorithm: str, data: bytes | None = None, path: str | os.PathLike | None = None,
              chunk: int = 8 << 20) -> str:
    """The hex digest of ``data``, or of the file at ``path`` read in ``chunk``s."""
    if data is not None:
        return crc32c_hex(data) if algorithm == "crc32c" else hashlib.sha256(data).hexdigest()
    h = google_crc32c.Checksum() if algorithm == "crc32c" else hashlib.sha256()
    assert path is not None
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    out = h.hexdigest()
    return out.decode() if isinstance(out, bytes) else out


MEMORY_FETCH_BYTES = 64 << 20  # shards up to this size are fetched into memory, larger ones streamed to disk


def download_verified(shard: ShardInfo, dest: str, fs_for: Callable[[], tuple]) -> None:
    """Downloads ``shard`` to ``dest`` with retries; checks size and checksum.

    A shard of at most ``MEMORY_FETCH_BYTES`` comes in one GET into memory (``cat_file`` from
    offset 0: no HEAD first), is hashed there and written with one call: a stream to disk in
    64 KiB chunks, then a second pass over the file for the hash, moved half the bytes per
    second on a busy 2-core machine. Larger shards are streamed to disk (memory stays bounded
    by the downloads in flight). A mismatch is retried once (a truncated transfer looks the
    same), then it is a :class:`StorageError` naming the shard's URL.
    """
    in_memory = shard.bytes <= MEMORY_FETCH_BYTES
    for attempt in range(2):
        def get() -> bytes | None:
            fs, path = fs_for()
            if in_memory:
                return fs.cat_file(path, start=0)
            fs.get_file(path, dest)
            return None

        data = storage.retry(get, what=shard.url)
        size = len(data) if data is not None else os.path.getsize(dest)
        if size != shard.bytes:
            problem = f"size {size} bytes, index says {shard.bytes}"
        else:
            check = shard.checksum
            digest = "" if check is None else digest_of(check[0], data, dest)
            if check is None or digest == check[1]:
                if data is not None:
                    with open(dest, "wb") as f:
                        f.write(data)
                return
            problem = f"{check[0]} {digest}, index says {check[1]}"
        log.warning("%s: %s (attempt %d)", shard.url, problem, attempt + 1)
    raise StorageError(f"{shard.url}: corrupt shard: {problem}")


class ShardCache:
    """Fetches shards into ``directory`` on demand and ahead of use; see the module doc."""

    def __init__(
        self,
        directory: str | os.PathLike,
        shards: Sequence[ShardInfo],
        cache_bytes: int,
        next_use: Callable[[int], np.ndarray],
        fs_for: Callable[[str], tuple],
        threads: int = 4,
        schedule_key: Callable[[int], Hashable] | None = None,
        next_use_of: Callable[[int, np.ndarray], np.ndarray] | None = None,
        upcoming: Callable[[int, int], np.ndarray] | None = None,
        max_threads: int | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.shards = list(shards)
        self.cache_bytes = int(cache_bytes)
        self.next_use = next_use  # position -> per-shard next global position of use
        self.fs_for = fs_for
        self.threads = max(1, int(threads))  # concurrent prefetches (raised by more_threads)
        self.max_threads = max(self.threads, int(max_threads or 0))
        self.schedule_key = schedule_key  # position -> what decides the prefetch schedule (the window)
        # O(cached) / O(ahead) forms of the same two questions (the Stream passes them; without
        # them both are answered from next_use over every shard)
        self.next_use_of = next_use_of  # (position, shards) -> next_use(position)[shards]
        self.upcoming = upcoming  # (position, ahead) -> the current window's shards, then the next ahead
        self.on_evict: Callable[[int], None] | None = None  # told when this process evicts a shard
        # told, in the thread that fetched it, the shards of a file that just became complete
        self.on_fetched: Callable[[list[int]], None] | None = None
        # > 0 in a DataLoader worker whose main process fetches ahead for it: how long a demand
        # for a shard nobody fetches yet waits for that process to start it before fetching it
        # here (a worker that never downloads never pays for a store client of its own)
        self.follow_wait = 0.0
        biggest = max((s.bytes for s in self.shards), default=0)
        if self.cache_bytes < biggest:
            raise ConfigError(
                f"cache_bytes={self.cache_bytes} is smaller than the largest shard ({biggest} bytes)"
            )
        self._by_local: dict[str, list[int]] = {}  # file -> its shards (several: Parquet row groups)
        for i, s in enumerate(self.shards):
            self._by_local.setdefault(s.local_name, []).append(i)
        self.stats: Counter[str] = Counter()
        self.fetched: list[int] = []  # shard indices fetched by this process, in order
        self.evicted: list[int | None] = []  # shard indices this process evicted (None: unknown file)
        self._position = 0
        self._pid = -1
        self._setup()

    # -- per-process runtime (rebuilt after fork) ----------------------------------------
    def _setup(self) -> None:
        self._pid = os.getpid()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tlock = threading.Lock()
        self._lockfile = open(self.dir / ".lock", "a+b")  # noqa: SIM115 - lives as long as self
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[int, Future] = {}
        self._mutex = threading.Lock()  # guards _inflight, _gated, threads
        self._gate = threading.Semaphore(self.threads)  # a prefetch downloads while it holds one
        self._gated: set[int] = set()  # prefetches waiting for the gate
        self._closing = False
        self._present: set[int] = set()  # shards this process saw complete (may go stale: see forget)
        self._last_key: Hashable = object()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self.stats = Counter()
            self.fetched, self.evicted = [], []
            self._setup()

    def __getstate__(self):
        d = self.__dict__.copy()
        for k in ("_tlock", "_lockfile", "_pool", "_inflight", "_mutex", "_gate", "_gated", "_closing", "_present",
                  "_last_key"):
            d.pop(k, None)
        d["_pid"] = -1
        return d

    def __setstate__(self, d) -> None:
        self.__dict__.update(d)
        self._setup()

    def close(self) -> None:
        if self._pid == os.getpid() and self._pool is not None:
            self._closing = True  # prefetches still waiting for the gate download nothing
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def more_threads(self, n: int) -> None:
        """Lets ``n`` prefetches (at most ``max_threads``) download at once from now on (never
        fewer than before): the Stream starts with a few and sets the number it measured."""
        self._check_pid()
        with self._mutex:
            n = min(int(n), self.max_threads)
            extra, self.threads = n - self.threads, max(self.threads, n)
        for _ in range(max(0, extra)):
            self._gate.release()

    # -- public ------------------------------------------------------------------------
    def path(self, i: int) -> str:
        """Local path of shard ``i``, fetching it now if needed (blocks)."""
        return self._get(i, hold=False)

    def open(self, i: int) -> BinaryIO:
        """Shard ``i`` as an open file, fetching it now if needed (blocks). An open file stays
        readable when a neighbour evicts it, so a fetched shard is opened under the lock that
        evictions take: fetched, then opened by its path, two processes demanding each other's
        shards from a tight cache evicted each one's fetch before it was opened, again and again."""
        return self._get(i, hold=True)

    def _here(self, i: int, hold: bool) -> str | BinaryIO | None:
        final = self.dir / self.shards[i].local_name
        if hold:
            try:
                f = open(final, "rb")  # noqa: SIM115 - the caller's to close
            except FileNotFoundError:
                self._present.discard(i)
                return None
        elif not (i in self._present or final.exists()):
            return None
        self._present.add(i)
        return f if hold else str(final)

    def _get(self, i: int, hold: bool):
        self._check_pid()
        got = self._here(i, hold)
        if got is not None:
            self.stats["hits"] += 1
            return got
        with self._mutex:
            fut = self._inflight.get(i)
            gated = i in self._gated
        if fut is not None and (fut.cancel() or gated):  # not downloading yet: fetch it here, now
            self._done(i, fut)  # (a gated prefetch finds it fetched, or being fetched, and returns)
            fut = None
        if fut is not None:
            if fut.result() is not None:
                got = self._here(i, hold)
                if got is not None:
                    self.stats["waits"] += 1
                    return got
        elif self.follow_wait > 0:
            self._await_leader(i)
        return self._fetch(i, demand=True, hold=hold)

    def ready(self, i: int) -> bool:
        """Whether shard ``i`` is here (``path`` would not wait)."""
        self._check_pid()
        return i in self._present or (self.dir / self.shards[i].local_name).exists()

    def first_ready(self, shards: Sequence[int]) -> int:
        """One of ``shards`` that is here, once one is: the first to complete of those being
        fetched (by this process, or by the main process for its DataLoader workers); if none
        is on its way, the first of them (the caller's read then fetches it)."""
        self._check_pid()
        rescan = 0.0
        while True:
            for i in shards:
                if self.ready(i):
                    return i
            with self._mutex:
                futs = {self._inflight[i]: i for i in shards if i in self._inflight}
            if futs:
                done, _ = wait(list(futs), return_when=FIRST_COMPLETED)
                return futs[next(iter(done))]
            if self.follow_wait <= 0:
                return shards[0]
            if time.monotonic() >= rescan:  # a listing under the lock: not at every look
                with self._locked():
                    _, _, inflight = self._scan()
                if not any(self.shards[i].name in inflight for i in shards):
                    return shards[0]
                rescan = time.monotonic() + 0.05
            time.sleep(0.002)

    def _await_leader(self, i: int) -> None:
        """Returns once shard ``i`` is complete or being fetched by some process (the demand
        fetch then waits for it), once the cache has no room for it (the main process would
        not prefetch it: fetching it here may evict), or after ``follow_wait`` seconds."""
        shard = self.shards[i]
        final = self.dir / shard.local_name
        deadline = time.monotonic() + self.follow_wait
        while time.monotonic() < deadline:
            with self._locked():
                used, _, inflight = self._scan()
            if final.exists() or shard.name in inflight or used + shard.bytes > self.cache_bytes:
                return
            time.sleep(0.005)
        self.stats["lead_timeouts"] += 1

    def forget(self, i: int) -> None:
        """Shard ``i`` turned out to be gone (evicted by another process)."""
        self._present.discard(i)

    def advance(self, position: int, ahead: int, evict_position: int | None = None) -> None:
        """Tells the cache the reader is at global ``position``; starts fetching the shards of
        the current window plus the next ``ahead`` shards, in order of first use (each admitted
        only if it evicts nothing needed sooner). Eviction decisions use ``evict_position``
        (default ``position``): set it lower when other readers of the node may lag behind."""
        self._check_pid()
        self._position = position if evict_position is None else evict_position
        if ahead <= 0:
            return
        key = self.schedule_key(position) if self.schedule_key is not None else position
        if key == self._last_key:  # same window as last time: the schedule is unchanged
            return
        self._last_key = key
        if self.upcoming is not None:
            wanted = self.upcoming(position, ahead)
        else:
            nu = self.next_use(position)
            wanted = np.argsort(nu, kind="stable")[: int((nu <= position).sum()) + ahead]
        for i in wanted:
            i = int(i)
            if i in self._present:
                continue
            if (self.dir / self.shards[i].local_name).exists():
                self._present.add(i)
                continue
            with self._mutex:
                if i in self._inflight:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix="trainkit-prefetch")
                fut = self._pool.submit(self._prefetch, i)
                self._inflight[i] = fut
            # outside the mutex: the callback runs at once (and takes it) if fut is done
            fut.add_done_callback(lambda f, i=i: self._done(i, f))

    def usage(self) -> int:
        """Bytes in the directory: complete shards plus reservations of downloads in flight."""
        return self._scan()[0]

    # -- internals ---------------------------------------------------------------------
    def _done(self, i: int, fut: Future) -> None:
        with self._mutex:
            if self._inflight.get(i) is fut:
                del self._inflight[i]

    def _prefetch(self, i: int) -> str | None:
        with self._mutex:
            self._gated.add(i)
        self._gate.acquire()
        with self._mutex:
            self._gated.discard(i)
        try:
            return None if self._closing else self._fetch(i, demand=False)
        except StorageError as exc:
            # the demand fetch will raise it with the shard URL; here just note it
            log.debug("prefetch of %s failed: %s", self.shards[i].url, exc)
            return None
        finally:
            self._gate.release()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_UN)

    def _scan(self) -> tuple[int, list[tuple[str, int, list[int] | None]], set[str]]:
        """(used bytes, complete files [(name, size, its shards or None)], names in flight)."""
        used = 0
        files: list[tuple[str, int, list[int] | None]] = []
        inflight: set[str] = set()
        with os.scandir(self.dir) as it:
            for e in it:
                name = e.name
                if name == ".lock":
                    continue
                if name.startswith(".tmp."):
                    try:
                        _, rest = name.split(".tmp.", 1)
                        shard_name, size, pid, _rand = rest.rsplit(".", 3)
                        size_i, pid_i = int(size), int(pid)
                    except ValueError:
                        size_i, pid_i, shard_name = 0, -1, ""
                    if pid_i < 0 or not _pid_alive(pid_i):
                        try:  # a crashed attempt's leftovers: never trusted, removed
                            os.unlink(e.path)
                            self.stats["stale_removed"] += 1
                        except FileNotFoundError:
                            pass
                        continue
                    try:
                        size_i = max(size_i, e.stat().st_size)
                    except FileNotFoundError:
                        continue
                    used += size_i
                    inflight.add(shard_name)
                    continue
                try:
                    size = e.stat().st_size
                except FileNotFoundError:
                    continue
                used += size
                files.append((name, size, self._by_local.get(name)))
        return used, files, inflight

    def _admit(self, i: int, demand: bool) -> str:
        shard = self.shards[i]
        final = self.dir / shard.local_name
        with self._locked():
            if final.exists():
                return _PRESENT
            used, files, inflight = self._scan()
            if shard.name in inflight:
                return _BUSY
            need = shard.bytes
            if used + need > self.cache_bytes:
                never = float("inf")
                known = [j for _, _, js in files for j in js or ()] + [i]
                if self.next_use_of is not None:  # O(cached files), not O(shards)
                    uses = self.next_use_of(self._position, np.array(known, dtype=np.int64))
                else:
                    uses = self.next_use(self._position)[known]
                at = dict(zip(known, np.asarray(uses, dtype=np.float64).tolist()))
                limit = -1.0 if demand else at[i]
                # a file is needed when the first of its shards is
                victims = sorted(((never if js is None else min(at[j] for j in js), name, size, js)
                                  for name, size, js in files), key=lambda v: v[0], reverse=True)
                for v_next, name, size, js in victims:
                    if used + need <= self.cache_bytes:
                        break
                    if not demand and v_next <= limit:
                        break
                    try:
                        os.unlink(self.dir / name)
                        self.stats["evictions"] += 1
                        self.evicted.extend(js if js is not None else [None])
                        for j in js or ():
                            self._present.discard(j)
                            if self.on_evict is not None:
                                self.on_evict(j)
                    except FileNotFoundError:
                        pass
                    used -= size
                if used + need > self.cache_bytes:
                    return _DEFERRED
            tmp = self.dir / f".tmp.{shard.name}.{need}.{os.getpid()}.{secrets.token_hex(4)}"
            tmp.touch()
            return str(tmp)

    def _fetch(self, i: int, demand: bool, hold: bool = False):
        """Shard ``i``'s path (``hold``: an open file, opened under the lock the shard entered
        the cache under), or None for a prefetch that is not admitted."""
        shard = self.shards[i]
        final = self.dir / shard.local_name
        delay = 0.005
        while True:
            r = self._admit(i, demand)
            if r == _PRESENT:
                got = self._here(i, hold)
                if got is None:  # evicted since: admitted again, and fetched
                    continue
                return got
            if r in (_BUSY, _DEFERRED):
                if not demand:
                    return None
                time.sleep(delay)  # another process is fetching it, or freeing space
                delay = min(delay * 2, 0.02)
                continue
            tmp = r
            try:
                download_verified(shard, tmp, lambda: self.fs_for(shard.url))
                with self._locked():  # every change of the directory's listing is made under the lock
                    os.replace(tmp, final)
                    held = open(final, "rb") if hold else None  # noqa: SIM115 - the caller's to close
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            self.stats["fetches"] += 1
            self.stats["fetched_bytes"] += shard.bytes
            self.fetched.append(i)
            self._present.add(i)
            if self.on_fetched is not None:
                self.on_fetched(self._by_local[shard.local_name])
            return held if hold else str(final)


class LocalShards:
    """file:// datasets are read in place (no copy); each shard's checksum is verified once
    per process, on first use."""

    def __init__(self, shards: Sequence[ShardInfo], verify: bool = True) -> None:
        self.shards = list(shards)
        self.verify = verify
        self._ok: set[int] = set()
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()

    def __getstate__(self):
        d = self.__dict__.copy()
        d.pop("_lock")
        return d

    def __setstate__(self, d) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def path(self, i: int) -> str:
        shard = self.shards[i]
        p = storage.local_path(shard.url)
        if i in self._ok:
            return p
        with self._lock:
            if i not in self._ok:
                if not os.path.exists(p):
                    raise StorageError(f"{shard.url}: shard missing")
                size = os.path.getsize(p)
                if size != shard.bytes:
                    raise StorageError(f"{shard.url}: corrupt shard: size {size} bytes, index says {shard.bytes}")
                check = shard.checksum if self.verify else None
                if check is not None:
                    digest = digest_of(check[0], path=p)
                    if digest != check[1]:
                        raise StorageError(f"{shard.url}: corrupt shard: {check[0]} {digest}, index says {check[1]}")
                self._ok.add(i)
        return p

    def open(self, i: int) -> BinaryIO:
        return open(self.path(i), "rb")  # noqa: SIM115 - the caller's to close

    def advance(self, position: int, ahead: int, evict_position: int | None = None) -> None:
        pass

    def ready(self, i: int) -> bool:
        return True

    def first_ready(self, shards: Sequence[int]) -> int:
        return shards[0]

    def forget(self, i: int) -> None:
        pass

    def usage(self) -> int:
        return 0

    def close(self) -> None:
        pass


def warn_small_cache(cache_bytes: int, window_bytes: int) -> None:
    if cache_bytes < window_bytes:
        warnings.warn(
            f"cache_bytes={cache_bytes} is smaller than one shuffle window of shards ({window_bytes} bytes): "
            "shards will be fetched more than once per epoch; raise cache_bytes or lower shuffle_window",
            stacklevel=3,
        )
