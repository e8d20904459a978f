"""PreemptionWatcher: signals in real subprocesses, AWS/GCP metadata pollers against a fake
metadata server on 127.0.0.1, and the cross-rank stop agreement on 2 gloo processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trainkit.checkpoint import Checkpointer
from trainkit.errors import EXIT_PREEMPTED
from trainkit.preemption import PreemptionWatcher, StepAgreement

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKERS = HERE / "preempt_workers.py"


class FakeMetadata:
    """Plays AWS IMDSv2 and the GCE metadata server on loopback.

    The AWS spot notice / GCP preempted flag appear after ``notice_after`` polls."""

    TOKEN = "tok-123"

    def __init__(self, notice_after: int = 3) -> None:
        self.notice_after = notice_after
        self.aws_polls = 0
        self.gcp_polls = 0
        self.token_puts = 0
        self.rejected = 0
        self.preempted = threading.Event()
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    fake.token_puts += 1
                    return self._send(200, fake.TOKEN.encode())
                return self._send(400)

            def do_GET(self):
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != fake.TOKEN:
                        fake.rejected += 1
                        return self._send(401)
                    fake.aws_polls += 1
                    if fake.aws_polls <= fake.notice_after:
                        return self._send(404, b"Not Found")
                    body = json.dumps({"action": "terminate", "time": "2026-11-22T03:30:00Z"}).encode()
                    return self._send(200, body, "application/json")
                if self.path.startswith("/computeMetadata/v1/instance/preempted"):
                    if self.headers.get("Metadata-Flavor") != "Google":
                        fake.rejected += 1
                        return self._send(403)
                    fake.gcp_polls += 1
                    if "wait_for_change=true" in self.path:
                        fake.preempted.wait(5)
                    elif fake.gcp_polls > fake.notice_after:
                        fake.preempted.set()
                    return self._send(200, b"TRUE" if fake.preempted.is_set() else b"FALSE")
                return self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.preempted.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata():
    fake = FakeMetadata()
    yield fake
    fake.close()


def test_aws_spot_notice_after_polls(metadata):
    w = PreemptionWatcher(signals=[], aws_endpoint=metadata.endpoint, poll_seconds=0.02).start()
    try:
        assert w.wait(10), "no notice seen"
    finally:
        w.stop()
    assert metadata.aws_polls == metadata.notice_after + 1
    assert metadata.token_puts == 1 and metadata.rejected == 0  # IMDSv2: one token, reused
    assert w.reason == "aws spot instance-action: terminate at 2026-11-22T03:30:00Z"


def test_gcp_preempted_after_polls(metadata):
    w = PreemptionWatcher(signals=[], gcp_endpoint=metadata.endpoint, poll_seconds=0.02).start()
    try:
        assert w.wait(10)
    finally:
        w.stop()
    assert metadata.gcp_polls == metadata.notice_after + 1 and metadata.rejected == 0
    assert w.reason == "gcp instance preempted"


def test_gcp_wait_for_change(metadata):
    w = PreemptionWatcher(signals=[], gcp_endpoint=metadata.endpoint, poll_seconds=0.5,
                          gcp_wait_for_change=True).start()
    try:
        time.sleep(0.3)
        assert not w.requested
        metadata.preempted.set()  # the long poll returns at once
        assert w.wait(3)
    finally:
        w.stop()
    assert metadata.gcp_polls == 1


def test_no_endpoint_no_poller_and_errors_are_survived():
    w = PreemptionWatcher(signals=[]).start()
    assert w.pollers == []  # nothing is contacted unless configured
    w.stop()
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    w = PreemptionWatcher(signals=[], aws_endpoint=dead, gcp_endpoint=dead, poll_seconds=0.02).start()
    time.sleep(0.3)
    assert not w.requested and all(p.errors > 0 and p.is_alive() for p in w.pollers)
    w.stop()
    with pytest.raises(ValueError):
        PreemptionWatcher(aws_endpoint="127.0.0.1:9")  # a URL with its scheme is required, never guessed


def test_request_first_reason_wins_and_agree_without_dist():
    w = PreemptionWatcher(signals=[])
    agreement = StepAgreement()
    assert agreement.lag == 0 and not agreement.decide(w.requested, False).stop
    assert w.request("ray drain") and not w.request("later")
    assert w.requested and w.reason == "ray drain" and agreement.decide(w.requested, True).stop


def _env(extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
@pytest.mark.rotate("stop-signal")
def test_signal_stops_once_and_second_signal_is_ignored(tmp_path, sig):
    out = tmp_path / "saved.json"
    args = {"signals": ["SIGTERM", "SIGINT", "SIGUSR1"], "save_seconds": 0.6, "out": str(out)}
    p = subprocess.Popen([sys.executable, str(WORKERS), "signals", json.dumps(args)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        assert p.stdout.readline().strip() == "READY"
        time.sleep(0.1)
        p.send_signal(getattr(signal, sig))
        assert p.stdout.readline().startswith("STOP")
        assert p.stdout.readline().strip() == "SAVING"
        p.send_signal(signal.SIGTERM)  # impatient orchestrator / second Ctrl-C during the save
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == EXIT_PREEMPTED == 75, err
    assert "SAVED" in rest
    saved = json.loads(out.read_text())
    assert saved["reason"] == f"signal {sig}" and saved["signals"] == 3
    assert "ignored while stopping" in err
    assert f"{sig} received: stopping at the next step boundary (checkpoint, exit 75)" in err


def test_the_signal_line_says_what_the_process_will_do():
    """A torchft replica group leaves its quorum on a notice rather than saving: its line says so."""
    code = ("import os, signal, time\n"
            "from trainkit.preemption import PreemptionWatcher\n"
            "w = PreemptionWatcher(signals=['SIGUSR1'], on_stop='leave the quorum and exit 76').start()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "while not w.requested: time.sleep(0.01)\n")
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "SIGUSR1 received: stopping at the next step boundary (leave the quorum and exit 76)" in result.stderr


def test_ranks_agree_on_one_stop_step(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    root = str(tmp_path / "ck")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(WORKERS), "agree", json.dumps({"root": root, "out": str(out)})],
                              env=_env({"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                        "MASTER_PORT": str(port)}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
             for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not all((out / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        time.sleep(0.3)
        procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [75, 75], errs
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["step"] == r1["step"] > 1
    assert r1["reason"] == "signal SIGTERM" and r0["reason"].startswith("peer rank")
    ck = Checkpointer(root)
    assert ck.latest_step() == r0["step"]  # the emergency checkpoint is committed at that step
    import torch

    target = {"state": {"weights": {"w": torch.zeros(4)}, "counter": {"step": 0}}}
    assert ck.load(target) == r0["step"]
    assert target["state"]["counter"]["step"] == r0["step"]
    assert torch.equal(target["state"]["weights"]["w"], torch.full((4,), float(r0["step"])))
