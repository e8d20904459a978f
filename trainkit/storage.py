"""Every path trainkit reads or writes goes through here: fsspec, plus retries.

Object stores fail transiently (503 SlowDown, resets, timeouts) far more often than local
disks; each caller wraps its requests in :func:`retry` so a blip costs a pause, not a run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from trainkit import _compat
from trainkit.errors import ConfigError, StorageError

T = TypeVar("T")

# gcsfs first tries a gRPC bucket-type lookup that stalls for a minute against emulators and
# private endpoints; plain JSON API calls work everywhere.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}


def configure(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Sets per-protocol fsspec options (``{"s3": {"endpoint_url": ...}}``) for this process."""
    _STORAGE_OPTIONS.clear()
    _STORAGE_OPTIONS.update({k: dict(v) for k, v in options.items()})


def configured() -> dict[str, dict[str, Any]]:
    """A copy of what :func:`configure` set, e.g. to put it back after changing it."""
    return {k: dict(v) for k, v in _STORAGE_OPTIONS.items()}


def check_options(options: Mapping[str, Any]) -> None:
    """``storage.<protocol>.*``: each protocol is one fsspec knows, each value a mapping.

    The option names themselves are the filesystem's keyword arguments; s3fs, gcsfs and adlfs
    take ``**kwargs`` and pass them on, so they are checked by the filesystem when it is made
    (``prepare`` makes it before any worker starts).
    """
    from fsspec.registry import known_implementations, registry

    for proto, opts in options.items():
        if proto not in known_implementations and proto not in registry:
            raise ConfigError(f"storage.{proto}: no fsspec filesystem for protocol {proto!r}; "
                              f"e.g. {', '.join(('s3', 'gs', 'az', 'file', 'memory'))}")
        if not isinstance(opts, Mapping):
            raise ConfigError(f"storage.{proto}={opts!r} must be a mapping of filesystem options")


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def storage_options(url: str) -> dict[str, Any]:
    proto = protocol(url)
    aliases = {"gcs": "gs", "s3a": "s3", "abfs": "az", "abfss": "az"}  # adlfs serves all three
    return dict(_STORAGE_OPTIONS.get(proto) or _STORAGE_OPTIONS.get(aliases.get(proto, proto)) or {})


_forking_loop: list[Any] = [None]


def _before_fork() -> None:
    _forking_loop[0] = _compat.fsspec_io_loop()


def _after_fork_in_child() -> None:
    """fsspec starts a new loop in the child; the copy of the parent's must not act on the
    parent's sockets (see ``trainkit._compat.detach_forked_loop``)."""
    loop, _forking_loop[0] = _forking_loop[0], None
    if loop is not None:
        _compat.detach_forked_loop(loop)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for ``url``, with configured options."""
    return url_to_fs(url, **storage_options(url))


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def local_path(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


class Failures(Exception):
    """Several failures of one operation, e.g. one per rank of a DCP save that every rank
    sees alike. (Python 3.10, which trainkit supports, has no ExceptionGroup.)"""

    def __init__(self, message: str, errors: list[BaseException]) -> None:
        super().__init__(message)
        self.errors = list(errors)


_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.ECONNREFUSED, errno.EPIPE}
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
# azure-core's errors for a request that never got an answer or lost it midway (adlfs passes
# them on); its own retry policy repeats these too. By name: azure is an optional dependency.
_AZURE_TRANSIENT = {"ServiceRequestError", "ServiceResponseError", "ServiceRequestTimeoutError",
                    "ServiceResponseTimeoutError", "IncompleteReadError"}


def is_transient(exc: BaseException) -> bool:
    """Whether a failed store request is worth repeating.

    s3fs turns 503 SlowDown into ``OSError(EBUSY, "Please reduce your request rate.")``,
    gcsfs keeps the HTTP status in ``.code`` and azure-core (adlfs) in ``.status_code``, so the
    errno and the status are checked before the message. A :class:`StorageError` is trainkit's
    own wrapping: it is as transient as its cause. :class:`Failures` (one per rank, e.g. a DCP
    save) are transient only when every one is: repeating the operation cannot help a rank
    that failed for good.
    """
    if isinstance(exc, Failures):
        return bool(exc.errors) and all(is_transient(e) for e in exc.errors)
    if isinstance(exc, StorageError):
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    statuses = [s for s in (getattr(exc, a, None) for a in ("code", "status", "status_code")) if isinstance(s, int)]
    if any(s in _TRANSIENT_HTTP for s in statuses):
        return True
    if type(exc).__name__ in _AZURE_TRANSIENT:
        return True
    if any(400 <= s < 600 for s in statuses):
        # the server answered, with a status that is not worth repeating; its message's request id
        # and time may contain "500" or "503" (Azurite's 403 did, one run in ten)
        return False
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("503", "500", "502", "504", "429", "slowdown", "slow down", "throttl", "reset",
               "timeout", "timed out", "temporarily", "serviceunavailable", "internalerror",
               "connection", "broken pipe", "server disconnected", "try again",
               # a body cut short (aiohttp's ClientPayloadError/ContentLengthError, IncompleteRead)
               "payload", "content length", "incomplete")
    return any(m in text for m in markers)


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 8,
    base_delay: float = 0.05,
    max_delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException], None] | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Calls ``fn`` until it succeeds, retrying transient errors with full-jitter backoff.

    A permanent error, or the last transient one, becomes a :class:`StorageError` naming
    ``what`` (the object's URL), so a failure says which object it was; a StorageError that
    ``fn`` raises has been through this already and passes unchanged. ``on_retry(attempt,
    error)`` hears each transient failure before the pause (a caller whose retries are rare
    and costly, a whole checkpoint save, logs them there). ``transient`` classifies the
    errors; a caller whose operation can also fail for a reason no store has (a checkpoint
    save's collectives, when a peer process dies) narrows it.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if not transient(exc) or attempt == attempts - 1:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
            if on_retry is not None:
                on_retry(attempt + 1, exc)
            sleep(random.uniform(0, min(max_delay, base_delay * 2**attempt)))
    raise AssertionError("unreachable")


def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` through :func:`retry` (the client is built inside it, so one
    that fails to start is retried as well). One request: s3fs sends a HEAD for the size
    before a ``cat_file`` without a range; with ``start=0`` it is one GET (gcsfs and adlfs
    send a range from 0, local files read as usual)."""

    def get() -> bytes:
        fs, path = filesystem(url)
        return fs.cat_file(path, start=0)

    return retry(get, what=url)


def read_json(url: str) -> Any:
    """The JSON document at ``url``; a :class:`StorageError` naming it when it is missing,
    unreadable or not JSON."""
    try:
        return json.loads(read_bytes(url))
    except ValueError as exc:
        raise StorageError(f"{url}: not valid JSON: {exc}") from exc


def balance(items: list[T], bins: int, size: Callable[[T], int]) -> list[list[T]]:
    """``items`` in at most ``bins`` groups of about equal total ``size`` (largest first into the
    lightest group): how a writer with ``bins`` threads spreads its bytes over files. Empty
    groups are dropped; no items give one empty group."""
    groups: list[list[T]] = [[] for _ in range(max(1, min(bins, len(items))))]
    sizes = [0] * len(groups)
    for item in sorted(items, key=size, reverse=True):
        i = sizes.index(min(sizes))
        groups[i].append(item)
        sizes[i] += size(item)
    return [g for g in groups if g] or [[]]
