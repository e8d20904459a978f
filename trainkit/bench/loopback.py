"""A multi-node Ray cluster on 127.0.0.1, for benches and tests that lose nodes.

Several raylets on this one machine play the nodes: a head with 0 CPUs (it hosts the GCS,
the driver and Ray Train's controller, like the on-demand head of ``launchers/aws-spot.yaml``)
and 1-CPU worker nodes that can be removed (with or without grace), drained and replaced.
Nothing listens or talks beyond loopback.
"""

from __future__ import annotations

import os
import time
from typing import Any

NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}


def loopback_env() -> None:
    """Process-wide settings before Ray starts: 127.0.0.1 only, no token auth, no usage stats."""
    from trainkit.launch.ray.session import pin_loopback

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pin_loopback()


class LoopbackCluster:
    """``ray.cluster_utils.Cluster`` with a 0-CPU head plus ``workers`` 1-CPU nodes."""

    def __init__(self, workers: int = 0, *, system_config: dict[str, Any] | None = None) -> None:
        loopback_env()
        from ray.cluster_utils import Cluster

        head = {**NODE_ARGS, "num_cpus": 0, "include_dashboard": False}
        if system_config:
            head["_system_config"] = system_config
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.ensure(workers)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def workers(self) -> list[Any]:
        return list(self.cluster.worker_nodes)

    def add(self) -> Any:
        return self.cluster.add_node(**NODE_ARGS)

    def remove(self, node: Any, graceful: bool = False) -> None:
        self.cluster.remove_node(node, allow_graceful=graceful)

    def ensure(self, n: int) -> None:
        """Exactly ``n`` live 1-CPU worker nodes."""
        while len(self.cluster.worker_nodes) < n:
            self.add()
        while len(self.cluster.worker_nodes) > n:
            self.remove(self.workers[-1], graceful=True)
        self.cluster.wait_for_nodes()

    def drain(self, node: Any, deadline_s: float, reason: str = "spot reclaim (simulated)") -> None:
        """Tells Ray the node goes away in ``deadline_s`` seconds, as a spot notice does.

        This is what the autoscaler (or KubeRay) does on a reclaim notice: the node takes no
        new work, and Ray Train's preemption watcher sees it (``ray.train.get_preemption_info``).
        """
        from trainkit import _compat

        ok, why = _compat.ray_drain_node(self.address, node.node_id, reason, int((time.time() + deadline_s) * 1000))
        if not ok:
            raise RuntimeError(f"Ray refused to drain node {node.node_id[:8]}: {why}")

    def warm_pids(self) -> list[int]:
        """PIDs of idle warm standby processes (:mod:`trainkit.launch.ray.warm_pool`), any job."""
        from trainkit import _compat
        from trainkit.launch.ray.warm_pool import NAMESPACE, idle_processes

        kv = _compat.RayKV(NAMESPACE, self.address)
        return [pid for _, _, pid in idle_processes({k: kv.get(k) for k in kv.keys(b"")})]

    def worker_pids(self) -> list[int]:
        """PIDs of Ray Train worker processes on our worker nodes (not other sessions')."""
        return [pid for node in self.workers for pid in self._train_pids(node)]

    def node_of(self, pid: int) -> Any:
        return next((node for node in self.workers if pid in self._train_pids(node)), None)

    def train_nodes(self) -> list[Any]:
        """Worker nodes that host a Ray Train worker right now."""
        return [node for node in self.workers if self._train_pids(node)]

    @staticmethod
    def _train_pids(node: Any) -> list[int]:
        import psutil

        pids = []
        for info in node.all_processes.get("raylet", []):
            try:
                for child in psutil.Process(info.process.pid).children(recursive=True):
                    if "RayTrainWorker" in " ".join(child.cmdline()):
                        pids.append(child.pid)
            except psutil.Error:
                pass
        return pids

    def shutdown(self) -> None:
        self.cluster.shutdown()

