"""The healing transfer: a live group serves its state to a replacement over HTTP.

torchft's own HTTP transport listens on every interface and unpickles what it receives
(``weights_only=False``); this one listens on the address it is given and loads with
``weights_only=True`` (tensors, numbers, strings and containers: what a model, optimizer and
schedule state dict hold), so a peer's bytes can never run code.
"""

from __future__ import annotations

import io
import threading
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torchft.checkpointing import CheckpointTransport


class LoopbackTransport(CheckpointTransport[Any]):
    """Serves the state snapshot taken at ``send_checkpoint`` under ``/<step>`` on ``host``."""

    def __init__(self, host: str = "127.0.0.1", timeout: timedelta = timedelta(seconds=30)) -> None:
        self._ready = threading.Condition()
        self._served: tuple[int, bytes] | None = None
        transport = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    step = int(self.path.strip("/"))
                except ValueError:
                    self.send_error(404, f"not a step: {self.path}")
                    return
                # The receiver may ask before this group's quorum thread has taken the snapshot.
                with transport._ready:
                    transport._ready.wait_for(lambda: transport._served is not None and transport._served[0] >= step,
                                              timeout.total_seconds())
                    served = transport._served
                if served is None or served[0] != step:
                    self.send_error(404, f"not serving step {step}")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(served[1])))
                self.end_headers()
                self.wfile.write(served[1])

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._host = host
        self._thread = threading.Thread(target=self._server.serve_forever, name="trainkit-ft-transport",
                                        daemon=True)
        self._thread.start()

    def metadata(self) -> str:
        return f"http://{self._host}:{self._server.server_address[1]}"

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        with self._ready:
            self._served = (step, buf.getvalue())
            self._ready.notify_all()

    def disallow_checkpoint(self) -> None:
        """Keeps serving: the bytes are a snapshot of step ``k``, valid for whoever asks for
        ``k`` later (a replacement may fetch after this group has moved on)."""

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
        with urllib.request.urlopen(f"{metadata}/{step}", timeout=timeout.total_seconds()) as resp:
            data = resp.read()
        return torch.load(io.BytesIO(data), weights_only=True)

    def shutdown(self, wait: bool = True) -> None:
        """Stops serving; ``wait=False`` returns at once (the serving loop notices within its
        poll interval), so a group leaving on a notice stops heartbeating without that delay."""
        def close() -> None:
            self._server.shutdown()
            self._server.server_close()

        if wait:
            close()
        else:
            threading.Thread(target=close, name="trainkit-ft-transport-close", daemon=True).start()
