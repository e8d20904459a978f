"""Helpers for the Ray suite: a loopback multi-node cluster and a background launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from launching import ROOT

NODE_ARGS = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}


class LoopbackCluster:
    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={**NODE_ARGS, "num_cpus": 0, "include_dashboard": False},
        )

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def add(self):
        return self.cluster.add_node(**NODE_ARGS)

    def remove(self, node, graceful: bool = False) -> None:
        self.cluster.remove_node(node, allow_graceful=graceful)

    def ensure(self, n: int) -> None:
        """Exactly ``n`` live 1-CPU worker nodes."""
        while len(self.cluster.worker_nodes) < n:
            self.add()
        while len(self.cluster.worker_nodes) > n:
            self.remove(self.workers[-1], graceful=True)
        self.cluster.wait_for_nodes()

    def worker_pids(self) -> list[int]:
        """PIDs of Ray Train worker processes on our worker nodes (not other sessions')."""
        import psutil

        pids = []
        for node in self.workers:
            for info in node.all_processes.get("raylet", []):
                try:
                    for child in psutil.Process(info.process.pid).children(recursive=True):
                        if "RayTrainWorker" in " ".join(child.cmdline()):
                            pids.append(child.pid)
                except psutil.Error:
                    pass
        return pids

    def node_of(self, pid: int):
        import psutil

        for node in self.workers:
            for info in node.all_processes.get("raylet", []):
                try:
                    if pid in {c.pid for c in psutil.Process(info.process.pid).children(recursive=True)}:
                        return node
                except psutil.Error:
                    pass
        return None

    def shutdown(self) -> None:
        self.cluster.shutdown()


def start_launch(*overrides: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m trainkit.launch ...`` in the background, output to ``log``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.setdefault("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "tests"), full_env.get("PYTHONPATH", "")) if p
    )
    out = open(log, "w")  # noqa: SIM115 - closed by the OS when the child ends
    return subprocess.Popen([sys.executable, "-m", "trainkit.launch", *overrides],
                            stdout=out, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{_tail(log)}")


def _tail(log: Path | None, n: int = 60) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
