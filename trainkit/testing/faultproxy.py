"""A small HTTP reverse proxy on loopback that injects store faults.

Put it between a client (s3fs, gcsfs) and a loopback store server to see how the client
copes with what real object stores do at scale::

    with FaultProxy(s3.endpoint, p_503=0.05, p_reset=0.02, latency=0.02) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.endpoint, ...)
        ...
        proxy.counts  # {"requests": .., "forwarded": .., "503": .., "reset": .., ...}

Faults:

* ``"503"``: an S3 ``SlowDown`` error (HTTP 503 with the S3 XML body) without contacting the
  upstream;
* ``"reset"``: the connection is closed with a TCP RST and no response (the request body, if
  any, is read first so the client sees a reset rather than a write error);
* ``"reset_mid"``: the upstream response starts (status and headers, part of the body) and
  then the connection is reset - a truncated download;
* ``latency``: every request waits this many seconds before it is forwarded.

Which request gets which fault is decided either by probabilities (seeded, so a test is
repeatable) or by ``schedule``, a callable ``(n, method, path) -> fault | None`` with ``n``
the 0-based number of the request among those eligible for faults (``methods`` restricts
faults, and this count, to those HTTP methods).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
)

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade", "proxy-connection"}

Schedule = Callable[[int, str, str], "str | None"]


def fail_first(n: int, fault: str = "503") -> Schedule:
    """A schedule: the first ``n`` requests get ``fault``."""
    return lambda i, method, path: fault if i < n else None


def every(k: int, fault: str = "503", offset: int = 0) -> Schedule:
    """A schedule: every ``k``-th request (from ``offset``) gets ``fault``."""
    return lambda i, method, path: fault if i >= offset and (i - offset) % k == 0 else None


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        p_503: float = 0.0,
        p_reset: float = 0.0,
        p_reset_mid: float = 0.0,
        latency: float = 0.0,
        schedule: Schedule | None = None,
        methods: Iterable[str] | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.upstream_host = u.hostname or "127.0.0.1"
        self.upstream_port = u.port or 80
        self.p_503, self.p_reset, self.p_reset_mid = p_503, p_reset, p_reset_mid
        self.latency = latency
        self.schedule = schedule
        self.methods = {m.upper() for m in methods} if methods else None
        self.enabled = True
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._n = 0
        self._eligible = 0  # requests that may get a fault (method filter passed)
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[int, str, str, str | None]] = []  # (n, method, path, fault)
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------------
    def configure(self, **kw) -> None:
        """Changes fault settings while running (``p_503=...``, ``latency=...``, ...)."""
        with self._lock:
            for k, v in kw.items():
                if k == "methods":
                    v = {m.upper() for m in v} if v else None
                if not hasattr(self, k):
                    raise AttributeError(k)
                setattr(self, k, v)
                if k == "schedule":
                    self._eligible = 0  # a new schedule counts from 0

    def clear(self) -> None:
        """No more faults and no latency (counters are kept)."""
        self.configure(p_503=0.0, p_reset=0.0, p_reset_mid=0.0, latency=0.0, schedule=None)

    @property
    def injected(self) -> int:
        return self.counts["503"] + self.counts["reset"] + self.counts["reset_mid"]

    @property
    def endpoint(self) -> str:
        h, p = self._server.server_address[:2]
        return f"http://{h}:{p}"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- decisions -----------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> tuple[str | None, float]:
        with self._lock:
            n = self._n
            self._n += 1
            self.counts["requests"] += 1
            fault = None
            if self.enabled and (self.methods is None or method in self.methods):
                k = self._eligible
                self._eligible += 1
                if self.schedule is not None:
                    fault = self.schedule(k, method, path)
                else:
                    r = self._rng.random()
                    if r < self.p_503:
                        fault = "503"
                    elif r < self.p_503 + self.p_reset:
                        fault = "reset"
                    elif r < self.p_503 + self.p_reset + self.p_reset_mid:
                        fault = "reset_mid"
            if fault:
                self.counts[fault] += 1
            self.log.append((n, method, path, fault))
            return fault, self.latency

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: with Nagle on, the client's delayed ACK
            # holds every small body ~40 ms, a cost no real store adds.
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        line = self.rfile.readline()
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                self.close_connection = True
                try:
                    self.connection.close()
                except OSError:
                    pass

            def _upstream(self) -> http.client.HTTPConnection:
                conn = getattr(self, "_up", None)
                if conn is None:
                    conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                    conn.connect()
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._up = conn
                return conn

            def _handle(self) -> None:
                method = self.command
                body = self._read_body()
                fault, latency = proxy._decide(method, self.path)
                if latency:
                    time.sleep(latency)
                if fault == "reset":
                    self._reset()
                    return
                if fault == "503":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if method == "HEAD" else len(SLOWDOWN_BODY)))
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(SLOWDOWN_BODY)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or method in ("PUT", "POST", "PATCH"):
                    headers["Content-Length"] = str(len(body))
                for attempt in range(2):
                    conn = self._upstream()
                    try:
                        conn.request(method, self.path, body=body, headers=headers)
                        resp = conn.getresponse()
                        break
                    except (ConnectionError, http.client.HTTPException, OSError):
                        conn.close()
                        self._up = None
                        if attempt:
                            self._reset()
                            return
                with proxy._lock:
                    proxy.counts["forwarded"] += 1
                length = resp.getheader("Content-Length")
                if length is None and method != "HEAD" and resp.status not in (204, 304):
                    data = resp.read()
                    length = str(len(data))
                else:
                    data = None
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                if method == "HEAD":
                    resp.read()
                    return
                if data is not None:
                    self.wfile.write(data)
                    return
                remaining = int(length or 0)
                cut = remaining // 2 if fault == "reset_mid" else -1
                sent = 0
                while remaining > 0:
                    chunk = resp.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    if cut >= 0 and sent + len(chunk) > cut:
                        self.wfile.write(chunk[: cut - sent])
                        self.wfile.flush()
                        resp.close()
                        conn.close()
                        self._up = None
                        self._reset()
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    remaining -= len(chunk)
                if fault == "reset_mid":  # empty body: nothing to cut, reset after headers
                    self._reset()

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (ConnectionError, socket.timeout, OSError):
                    self.close_connection = True

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass
                up = getattr(self, "_up", None)
                if up is not None:
                    up.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        return Handler


def main(argv: list[str] | None = None) -> None:
    """``python -m trainkit.testing.faultproxy UPSTREAM [--port N] [--latency S] [--p-503 P] ...``:
    runs a proxy in its own process (so its CPU does not compete with the client's GIL);
    prints ``READY <endpoint>`` once listening; stops on SIGTERM/SIGINT."""
    import argparse
    import signal
    import sys

    p = argparse.ArgumentParser(prog="python -m trainkit.testing.faultproxy")
    p.add_argument("upstream")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--p-503", type=float, default=0.0)
    p.add_argument("--p-reset", type=float, default=0.0)
    p.add_argument("--p-reset-mid", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    proxy = FaultProxy(a.upstream, latency=a.latency, p_503=a.p_503, p_reset=a.p_reset, p_reset_mid=a.p_reset_mid,
                       seed=a.seed, port=a.port)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"READY {proxy.endpoint}", flush=True)
    try:
        proxy._server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        proxy._server.server_close()
        sys.stdout.flush()


class ProxyProcess:
    """A :class:`FaultProxy` in a subprocess (for benchmarks): ``.endpoint``; ``stop()``."""

    def __init__(self, upstream: str, *, latency: float = 0.0, p_503: float = 0.0, p_reset: float = 0.0,
                 seed: int = 0) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainkit.testing.faultproxy", upstream, "--latency", str(latency),
             "--p-503", str(p_503), "--p-reset", str(p_reset), "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"fault proxy did not start: {line!r}")
        self.endpoint = line.split(" ", 1)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "ProxyProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    main()
