"""Warm standby worker processes, so a restarted Ray Train worker group trains again in seconds.

Experimental and opt-in (``launcher.warm_standby=1``): Ray has no public API for any of it,
so it stands on the Ray internals in :mod:`trainkit._compat` (the raylet's
``PrestartWorkers`` call, the GCS key-value store, the worker setup-hook variable), which a
Ray release may change without notice; ``tests/architecture/test_compat.py`` fails then.

Every restart of the worker group (a drain, a lost node, a crash) starts new worker
processes, and a new process spends most of a restart importing: Ray Train, torch,
``torch._dynamo`` (DDP's constructor imports it) and trainkit, about 5 s of the 7 s a drain
cost on the project's 2-core machine. Ray can start worker processes ahead of need (the
raylet's ``PrestartWorkers`` call, which Ray itself uses for task backlogs) and hands such an
idle process to the next actor of the same job and runtime env. With :func:`preload` as the
training workers' setup hook (:func:`preload_env`), those processes do the imports while
they wait.

* :func:`preload` runs in every process started with the training workers' runtime env. It
  imports what a training worker needs and, while the process is not an actor, keeps a
  heartbeat in Ray's KV store: that is how the driver counts the idle warm processes on each
  node.
* :class:`WarmPool`, a thread in the driver, keeps ``per_slot`` idle warm processes per worker
  slot (a node's CPUs or GPUs over one worker's, at most the job's worker count) on every
  live node that is not draining. It waits ``refill_after_s`` after a start or a restart
  took processes before it starts new ones, so that their imports do not compete with the
  group's restore and first steps.
* Ray matches an idle process by a hash of the serialized runtime env, which Ray Train
  builds on the controller; the training workers publish the env their own process got and
  its hash (:func:`publish_runtime_env`), and the pool starts warming once they are there.
  The first group therefore starts cold; every later one finds warm processes.

Warm processes belong to the job: the raylet ends them when the driver exits. A cluster
whose raylets refuse the call (another Ray version, token auth on the node manager) only
loses the speed-up: the pool says so once and stops.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "trainkit-warm"
# An idle process refreshes its heartbeat this often; one older than STALE_S is gone (used
# or killed with its node), and the pool deletes it after FORGET_S.
BEAT_S = 2.0
STALE_S = 7.0
FORGET_S = 60.0
# A requested process that has not said hello within this long is taken as failed.
START_TIMEOUT_S = 60.0
# The raylet keeps a prestarted process alive this long while it waits for work (the job's
# end ends it sooner).
KEEP_ALIVE_S = 7 * 24 * 3600


def _kv() -> Any:
    """Ray's KV store in the GCS (every process of the job reaches it)."""
    from trainkit import _compat

    return _compat.RayKV(NAMESPACE)


def _job_and_node() -> tuple[str, str]:
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_job_id(), ctx.get_node_id()


def preload_env() -> dict[str, str]:
    """The training workers' runtime env entry that runs :func:`preload` in their processes.

    This is the variable Ray's ``worker_process_setup_hook`` sets, placed in the workers' own
    runtime env (Ray accepts the option itself only for the whole job). Job-wide, every
    process of the job would import torch first, Ray Train's controller and its helper
    actors included: ~3 s more to start the job and a few CPU-seconds at each restart.
    """
    from trainkit import _compat

    return _compat.ray_setup_hook_env(f"{__name__}.preload")


def preload() -> None:
    """The training workers' setup hook: the imports of a training worker, then a heartbeat.

    Import errors are not fatal here (the process then imports lazily, as without the hook).
    Nothing here may initialize CUDA: Ray sets ``CUDA_VISIBLE_DEVICES`` when the actor
    arrives, and CUDA reads it once, at initialization (checked: these imports call no
    ``torch.cuda`` function).
    """
    with contextlib.suppress(Exception):
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
        import torch.distributed.checkpoint  # noqa: F401
        import ray.train.torch  # noqa: F401

        from trainkit import _compat

        _compat.ray_preload_train_worker()

        import trainkit.launch.ray.worker  # noqa: F401
        import trainkit.strategies  # noqa: F401
        import trainkit.train  # noqa: F401
    # The imports leave ~350k objects that live as long as the process. Frozen, they are out
    # of the collector's sight: otherwise the first full collection after the actor arrives
    # walks them all (0.3-0.9 s, measured during the checkpoint load), while the other ranks
    # wait in the next collective.
    gc.freeze()
    threading.Thread(target=_heartbeat, args=(env_tag(),), name="trainkit-warm-beat", daemon=True).start()


def env_tag() -> str:
    """The hash the raylet matches idle processes by (their runtime env's), from our command line."""
    from trainkit import _compat

    return _compat.ray_runtime_env_hash(sys.argv)


def _heartbeat(env: str) -> None:
    """While this process has no actor, says "idle on node N, runtime env E" every BEAT_S seconds.

    The first beat waits one period: a process started for an actor gets it within
    milliseconds of finishing this hook, and must not be counted as idle meanwhile.
    """
    import ray

    from trainkit import _compat

    try:
        if not ray.is_initialized() or not _compat.ray_is_worker_process():
            return  # a driver is never an idle worker
        kv = _kv()
        job, node = _job_and_node()
    except Exception:  # noqa: BLE001 - not connected: nothing to report
        return
    key = f"{job}/{node}/{env}/{os.getpid()}".encode()
    while True:
        time.sleep(BEAT_S)
        try:
            if ray.get_runtime_context().get_actor_id() is not None:
                kv.delete(key)
                return
            kv.put(key, str(time.time()).encode())
        except Exception:  # noqa: BLE001 - a GCS hiccup or shutdown: try again, or end with the process
            pass


def publish_runtime_env() -> None:
    """Run in a training worker (an actor, where Ray can tell its runtime env): hands the
    driver's pool that env to start warm processes with, and its hash to count them by."""
    import ray

    if not ray.is_initialized():  # not in a Ray worker (asking Ray would start one)
        return
    with contextlib.suppress(Exception):
        job, _ = _job_and_node()
        value = {"runtime_env": ray.get_runtime_context().get_runtime_env_string(), "tag": env_tag()}
        _kv().put(f"env/{job}".encode(), json.dumps(value).encode())


def idle_processes(beats: dict[bytes, bytes | None], now: float | None = None,
                   env: str | None = None) -> list[tuple[bytes, str, int]]:
    """``(key, node_id, pid)`` of the heartbeats (``{key: last beat}``) that are still fresh,
    of processes with runtime env tag ``env`` (None: any)."""
    now = time.time() if now is None else now
    out = []
    for key, beat in beats.items():
        with contextlib.suppress(TypeError, ValueError):
            _, node_id, tag, pid = key.decode().split("/")
            if beat is not None and now - float(beat) <= STALE_S and env in (None, tag):
                out.append((key, node_id, int(pid)))
    return out


def slots(resources: dict[str, float], cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many training workers fit on a node with ``resources`` (its totals)."""
    fits = [resources.get(name, 0.0) // need for name, need in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker))
            if need > 0]
    return int(min(fits)) if fits else 0


class WarmPool(threading.Thread):
    """Keeps ``per_slot`` idle warm worker processes per worker slot on each live node."""

    def __init__(self, *, workers: int, cpus_per_worker: float, gpus_per_worker: float, per_slot: int = 1,
                 refill_after_s: float = 20.0, every_s: float = 1.0) -> None:
        super().__init__(name="trainkit-warm-pool", daemon=True)
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.per_slot = per_slot
        self.refill_after_s = refill_after_s
        self.every_s = every_s
        self._pending: dict[str, list[float]] = {}
        self._seen: set[bytes] = set()
        self._idle_keys: set[bytes] = set()
        self._taken = False
        self._quiet_until: float | None = None
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        import ray

        self._job = ray.get_runtime_context().get_job_id()
        while not self._stop.wait(self.every_s):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the pool only ever speeds things up
                log.warning("trainkit: warm standby workers off (%s: %s)", type(exc).__name__, exc)
                return
        with contextlib.suppress(Exception):
            kv = _kv()
            for key in kv.keys(f"{self._job}/".encode()):
                kv.delete(key)

    def tick(self) -> int:
        """One round: counts idle warm processes per node, starts the missing ones. Returns how many."""
        import ray

        from trainkit import _compat

        published = _kv().get(f"env/{self._job}".encode())
        if not published:
            return 0
        env = json.loads(published)
        idle = self._idle_by_node(env["tag"])
        if self._quiet_until is None or self._taken:
            self._quiet_until = time.time() + self.refill_after_s
        if time.time() < self._quiet_until:
            return 0
        draining = set(_compat.ray_draining_nodes())
        started = 0
        for node in ray.nodes():
            node_id = node["NodeID"]
            if not node.get("Alive") or node_id in draining:
                continue
            # A node never hosts more of our workers than the job has (a 64-CPU node, 2 workers).
            fit = slots(node.get("Resources", {}), self.cpus_per_worker, self.gpus_per_worker)
            want = self.per_slot * min(fit, self.workers)
            now = time.time()
            pending = [t for t in self._pending.get(node_id, []) if now - t < START_TIMEOUT_S]
            missing = want - idle.get(node_id, 0) - len(pending)
            if missing > 0 and self._prestart(node, env["runtime_env"], missing):
                pending += [now] * missing
                started += missing
            self._pending[node_id] = pending
        return started

    def _idle_by_node(self, env: str) -> dict[str, int]:
        kv = _kv()
        beats = {k: kv.get(k) for k in kv.keys(f"{self._job}/".encode())}
        for key, beat in beats.items():  # processes gone with their node leave their key behind
            with contextlib.suppress(TypeError, ValueError):
                if beat is None or time.time() - float(beat) > FORGET_S:
                    kv.delete(key)
        idle: dict[str, int] = {}
        fresh = idle_processes(beats, env=env)
        keys = {key for key, _, _ in fresh}
        # An idle process whose heartbeat is gone (deleted when it became an actor, or stale
        # with its node) was taken by a restart.
        self._taken = bool(self._idle_keys - keys)
        self._idle_keys = keys
        for key, node_id, _ in fresh:
            idle[node_id] = idle.get(node_id, 0) + 1
            if key not in self._seen:  # a requested process said hello: no longer pending
                self._seen.add(key)
                if self._pending.get(node_id):
                    self._pending[node_id].pop(0)
        return idle

    def _prestart(self, node: dict[str, Any], runtime_env: str, n: int) -> bool:
        """Asks the node's raylet for ``n`` more processes; False when the node did not answer.

        A node that is going away is skipped for this round; a raylet that refuses the call
        (no such method, authentication) raises, which turns the pool off.
        """
        from trainkit import _compat

        return _compat.ray_prestart_workers(node["NodeManagerAddress"], node["NodeManagerPort"], self._job,
                                            runtime_env, n, KEEP_ALIVE_S)
