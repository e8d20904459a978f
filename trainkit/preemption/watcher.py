"""Signal handlers and cloud metadata pollers that set one preemption flag.

Nothing here has a default endpoint: a poller runs only when its endpoint is configured
(the real ones are ``http://169.254.169.254`` for AWS IMDS and
``http://metadata.google.internal`` for GCP; see docs/preemption.md). Importing this module
does not import torch.
"""

from __future__ import annotations

import json
import logging
import os
import signal as _signal
import threading
import weakref
import time
import urllib.error
import urllib.request
from collections.abc import Iterable

log = logging.getLogger("trainkit.preemption")

# metadata services are link-local: never route them through an HTTP proxy from the env
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _check_endpoint(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"metadata endpoint must be an http(s) URL, got {url!r}")
    return url


class _Poller(threading.Thread):
    """A daemon thread calling ``check()`` every ``poll_seconds`` until a notice or stop."""

    name_prefix = "poller"

    def __init__(self, endpoint: str, on_notice, poll_seconds: float, timeout: float) -> None:
        super().__init__(name=f"trainkit-{self.name_prefix}", daemon=True)
        self.endpoint = _check_endpoint(endpoint)
        self.on_notice = on_notice
        self.poll_seconds = max(0.01, float(poll_seconds))
        self.timeout = timeout
        self.polls = 0
        self.errors = 0
        self._stop_event = threading.Event()

    def check(self) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.polls += 1
            try:
                reason = self.check()
            except Exception as exc:  # noqa: BLE001 - a flaky metadata server must not kill training
                self.errors += 1
                if self.errors in (1, 10) or self.errors % 100 == 0:
                    log.warning("%s: %s poll failed (%d so far): %s", self.name, self.endpoint, self.errors, exc)
                reason = None
            if reason:
                self.on_notice(reason)
                return
            self._stop_event.wait(self.poll_seconds)

    def stop(self) -> None:
        self._stop_event.set()

    def _request(self, url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                 timeout: float | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with _OPENER.open(req, timeout=timeout or self.timeout) as r:  # noqa: S310 - configured endpoint
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read() if e.fp else b""


class AWSSpotPoller(_Poller):
    """EC2 spot interruption notice via IMDSv2.

    ``PUT {endpoint}/latest/api/token`` (header ``X-aws-ec2-metadata-token-ttl-seconds``) →
    token; ``GET {endpoint}/latest/meta-data/spot/instance-action`` with header
    ``X-aws-ec2-metadata-token``: 404 = no notice, 200 ``{"action": ..., "time": ...}`` = notice.
    """

    name_prefix = "aws-spot"
    TOKEN_TTL = 21600

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._token: str | None = None
        self._token_expiry = 0.0

    def _get_token(self) -> str:
        if self._token is None or time.monotonic() > self._token_expiry:
            status, body = self._request(f"{self.endpoint}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL)})
            if status != 200:
                raise RuntimeError(f"IMDSv2 token request answered {status}")
            self._token = body.decode().strip()
            self._token_expiry = time.monotonic() + self.TOKEN_TTL - 60
        return self._token

    def check(self) -> str | None:
        url = f"{self.endpoint}/latest/meta-data/spot/instance-action"
        status, body = self._request(url, headers={"X-aws-ec2-metadata-token": self._get_token()})
        if status == 401:  # token expired or revoked: fetch a new one next time
            self._token = None
            raise RuntimeError("IMDSv2 token rejected (401)")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"spot/instance-action answered {status}")
        try:
            notice = json.loads(body)
            action, when = notice.get("action", "?"), notice.get("time", "?")
        except (ValueError, AttributeError):
            action, when = body.decode(errors="replace")[:100], "?"
        return f"aws spot instance-action: {action} at {when}"


class GCPPreemptionPoller(_Poller):
    """GCE preemption flag: ``GET {endpoint}/computeMetadata/v1/instance/preempted`` with
    header ``Metadata-Flavor: Google``; ``TRUE`` = preempted. With ``wait_for_change`` it
    long-polls (``?wait_for_change=true&timeout_sec=N``) instead of polling."""

    name_prefix = "gcp-preempted"

    def __init__(self, *a, wait_for_change: bool = False, **kw) -> None:
        super().__init__(*a, **kw)
        self.wait_for_change = wait_for_change

    def check(self) -> str | None:
        url = f"{self.endpoint}/computeMetadata/v1/instance/preempted"
        timeout = None
        if self.wait_for_change:
            wait = max(1, int(self.poll_seconds * 12))
            url += f"?wait_for_change=true&timeout_sec={wait}"
            timeout = wait + self.timeout
        status, body = self._request(url, headers={"Metadata-Flavor": "Google"}, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"instance/preempted answered {status}")
        return "gcp instance preempted" if body.decode().strip().upper() == "TRUE" else None


class PreemptionWatcher:
    """One flag for every preemption source.

    ``start()`` (main thread) installs handlers for ``signals`` and starts the opt-in pollers.
    The first signal or notice sets the flag and the reason; later signals are only counted
    and logged (never raise, so an emergency checkpoint in progress is not interrupted; use
    SIGKILL to abort). ``request(reason)`` sets it from code (e.g. a Ray drain hook).
    """

    def __init__(self, signals: Iterable[str] = ("SIGTERM", "SIGINT", "SIGUSR1"), aws_endpoint: str = "",
                 gcp_endpoint: str = "", poll_seconds: float = 5.0, *, gcp_wait_for_change: bool = False,
                 http_timeout: float = 2.0, on_stop: str = "checkpoint, exit 75") -> None:
        self.signals = [self._signum(s) for s in signals]
        self.aws_endpoint = _check_endpoint(aws_endpoint)
        self.gcp_endpoint = _check_endpoint(gcp_endpoint)
        self.poll_seconds = poll_seconds
        self.gcp_wait_for_change = gcp_wait_for_change
        self.http_timeout = http_timeout
        # What the process does once stopped, for the line a signal prints: a run saves and
        # exits 75, a torchft replica group leaves its quorum instead.
        self.on_stop = on_stop
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._reason = ""
        self._sig_reason: str | None = None  # set by the signal handler: no locks there
        self.signal_count = 0
        self.requested_at: float | None = None
        self._old_handlers: dict[int, object] = {}
        self.pollers: list[_Poller] = []

    @staticmethod
    def _signum(s) -> int:
        if isinstance(s, int):
            return s
        name = s if str(s).startswith("SIG") else f"SIG{s}"
        try:
            return int(getattr(_signal, name.upper()))
        except AttributeError:
            raise ValueError(f"unknown signal {s!r}") from None

    # -- the flag ------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        return self._sig_reason is not None or self._event.is_set()

    @property
    def reason(self) -> str:
        return self._sig_reason or self._reason

    def request(self, reason: str) -> bool:
        """Sets the flag (first caller wins); returns True if this call set it."""
        with self._lock:
            if self.requested:
                return False
            self._reason = reason
            self.requested_at = time.monotonic()
            self._event.set()
        log.warning("preemption requested: %s", reason)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until a stop is requested (or ``timeout``); returns ``requested``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.requested:
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                break
            self._event.wait(left)
        return self.requested

    # -- lifecycle -----------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        self.signal_count += 1
        name = _signal.Signals(signum).name
        if not self.requested:
            # runs on the main thread between bytecodes, maybe inside a lock it holds: no
            # locks, no logging here, only plain assignments and a raw write
            self.requested_at = time.monotonic()
            self._sig_reason = f"signal {name}"
            msg = f"trainkit: {name} received: stopping at the next step boundary ({self.on_stop})\n"
        else:
            msg = f"trainkit: {name} received again ({self.signal_count}): ignored while stopping; SIGKILL aborts\n"
        try:
            os.write(2, msg.encode())
        except OSError:
            pass

    def start(self) -> "PreemptionWatcher":
        if self.signals:
            if threading.current_thread() is not threading.main_thread():
                log.warning("PreemptionWatcher.start() not on the main thread: signal handlers not installed")
            else:
                for s in self.signals:
                    self._old_handlers[s] = _signal.signal(s, self._handle)
        if self.aws_endpoint:
            self.pollers.append(AWSSpotPoller(self.aws_endpoint, self.request, self.poll_seconds, self.http_timeout))
        if self.gcp_endpoint:
            self.pollers.append(GCPPreemptionPoller(self.gcp_endpoint, self.request, self.poll_seconds,
                                                    self.http_timeout, wait_for_change=self.gcp_wait_for_change))
        for p in self.pollers:
            p.start()
        _RUNNING.add(self)
        return self

    def stop(self) -> None:
        """Stops pollers and restores the previous signal handlers (main thread)."""
        _RUNNING.discard(self)
        for p in self.pollers:
            p.stop()
        for p in self.pollers:
            p.join(timeout=self.http_timeout + 1)
        self.pollers = []
        if self._old_handlers and threading.current_thread() is threading.main_thread():
            for s, h in self._old_handlers.items():
                _signal.signal(s, h)
            self._old_handlers.clear()

    def __enter__(self) -> "PreemptionWatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_RUNNING: "weakref.WeakSet[PreemptionWatcher]" = weakref.WeakSet()


def drain_reason(nodes: list[str], deadline_ms: int | None) -> str:
    """The stop reason of a Ray node drain, as every launcher's log says it."""
    left = f", {max(0.0, deadline_ms / 1000 - time.time()):.0f}s before the deadline" if deadline_ms else ""
    names = ", ".join(n[:8] for n in nodes) or "?"
    return f"ray node drain ({names}{left})"


def request(reason: str) -> int:
    """Raises the flag of every started watcher in this process (a Ray drain hook, a custom
    notice source); returns how many were told."""
    watchers = list(_RUNNING)
    for watcher in watchers:
        watcher.request(reason)
    return len(watchers)
