"""Every name trainkit takes from a dependency that the dependency does not export publicly.

Each entry here is used because no public equivalent exists (said per entry), and
``tests/architecture/test_compat.py`` checks that each still exists and behaves as used, so
an upgrade that moves one fails in CI with the name, not at a user's checkpoint.
"""

from __future__ import annotations

import functools

import logging
from typing import Any

# torch.distributed.checkpoint's fsspec storage classes: DCP's own reader and writer for
# object stores, not re-exported from torch.distributed.checkpoint (torch 2.13).
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter

# The per-item location DCP's planners store in a checkpoint's metadata; a storage layer that
# writes its own files must produce it (no public constructor).
from torch.distributed.checkpoint.filesystem import _StorageInfo as StorageInfo


def dcp_debug_loggers() -> list[logging.Logger]:
    """DCP's and c10d's module loggers, which log every save at DEBUG even when nobody
    listens; trainkit quiets them only then (no public switch exists)."""
    from torch.distributed import c10d_logger
    from torch.distributed.checkpoint import logger as dcp_logger

    found = [getattr(dcp_logger, "_dcp_logger", None), getattr(c10d_logger, "_c10d_logger", None)]
    return [lg for lg in found if isinstance(lg, logging.Logger)]


def staging_stream(stager) -> object | None:
    """DCP ``DefaultStager``'s copy stream (None off an accelerator or without async staging):
    the checkpointer orders it after the training stream, and torch 2.13 exposes no way to."""
    return stager._staging_stream


_PLAN_CACHES = ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan",
                "_cached_metadata")


def caching_save_planner(key: str):
    """DCP's ``DefaultSavePlanner(enable_plan_caching=True)`` with its class-level caches
    under ``key`` instead of the class name, so that two checkpointers in one process (other
    states, other groups, saving at once from two threads) never use each other's plans.
    torch 2.13 keys them by ``_cached_plans_key`` and offers no way to choose it."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner(enable_plan_caching=True)
    planner._cached_plans_key = key
    return planner


def drop_save_plans(key: str) -> None:
    """Forgets what DCP's planners cached under ``key`` (the caches live as long as the process)."""
    from torch.distributed.checkpoint.planner import SavePlanner

    for name in _PLAN_CACHES:
        getattr(SavePlanner, name).pop(key, None)


__all__ = ["FileSystem", "FsspecReader", "FsspecWriter", "StorageInfo", "caching_save_planner", "dcp_debug_loggers",
           "drop_save_plans", "staging_stream", "RayKV", "RAY_PRIVATE_NAMES", "RAY_TRAIN_WORKER_MODULE",
           "ray_dashboard_up", "ray_drain_node", "ray_draining_nodes", "ray_lean_trainer", "ray_is_worker_process", "ray_keep_loopback", "ray_preload_train_worker",
           "ray_prestart_workers", "ray_runtime_env_hash", "ray_setup_hook_env", "ray_torchft_config",
           "ray_torchft_lighthouse_env",
           "ray_train_storage"]



def fsspec_io_loop() -> Any:
    """fsspec's event loop (``fsspec.asyn.loop[0]``: the loop its io thread runs; None until
    first use). fsspec exposes ``get_loop()``, which would start one."""
    import fsspec.asyn

    return fsspec.asyn.loop[0]


def detach_forked_loop(loop: Any) -> None:
    """In a forked child, makes the parent's asyncio loop (copied with the fork) harmless.

    The copy shares the parent's epoll instance. When a child garbage-collects an inherited
    s3fs filesystem, s3fs's finalizer sees the copied loop as running (its ``_thread_id`` came
    along) and closes the connections through it, which removes the *parent's* sockets from
    that shared epoll set: the parent's next request then waits for its read timeout (~16 s
    seen after DataLoader workers ended). Giving the copy a fresh selector and no thread
    makes those closes touch only the child. asyncio has no public way to do this.
    """
    import selectors

    loop._thread_id = None
    old, loop._selector = loop._selector, selectors.DefaultSelector()
    old.close()  # the child's descriptor of the shared epoll instance only


# -- Ray (checked with ray 2.60; the ray extra needs >=2.60 for the public API used) ------------
# launcher=ray uses Ray Train's public API (TorchTrainer, FailureConfig, ray.train.report,
# get_preemption_info, Checkpoint). What follows has no public equivalent in Ray 2.60.


def ray_keep_loopback() -> None:
    """Ray's "no cluster on this OS" switch, read per call from ``ray._private.ray_constants``:
    set by the environment variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before Ray is
    imported, and here when Ray was imported already (a test, a notebook). With it off, a Ray
    started with ``_node_ip_address="127.0.0.1"`` keeps listening and advertising 127.0.0.1."""
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def ray_train_storage() -> tuple[str, Any]:
    """The Ray Train run's experiment directory and its pyarrow filesystem, in a training worker.

    ``ray.train.get_context().get_storage()`` is a DeveloperAPI that returns Ray's internal
    ``StorageContext``; a reported pointer checkpoint must live under that directory for
    ``CheckpointUploadMode.NO_UPLOAD`` to accept it without a copy."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.experiment_fs_path, storage.storage_filesystem


class RayKV:
    """Ray's key-value store in the GCS (warm standby's heartbeats): in a process connected to
    Ray (``ray.experimental.internal_kv._internal_kv_*``), or from outside through a GCS
    address (``ray._raylet.GcsClient``). Ray offers no public KV store."""

    def __init__(self, namespace: str, gcs_address: str | None = None) -> None:
        self.namespace = namespace
        self._client = None
        if gcs_address:
            from ray._raylet import GcsClient

            self._client = GcsClient(address=gcs_address)

    def put(self, key: bytes, value: bytes) -> None:
        if self._client is not None:
            self._client.internal_kv_put(key, value, True, self.namespace.encode())
            return
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=self.namespace)

    def get(self, key: bytes) -> bytes | None:
        if self._client is not None:
            return self._client.internal_kv_get(key, self.namespace.encode())
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key, namespace=self.namespace)

    def delete(self, key: bytes) -> None:
        if self._client is not None:
            self._client.internal_kv_del(key, False, self.namespace.encode())
            return
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(key, namespace=self.namespace)

    def keys(self, prefix: bytes) -> list[bytes]:
        if self._client is not None:
            return list(self._client.internal_kv_keys(prefix, self.namespace.encode()))
        from ray.experimental import internal_kv

        return list(internal_kv._internal_kv_list(prefix, namespace=self.namespace))


def ray_draining_nodes() -> dict[str, int]:
    """``{node_id_hex: deadline_ms}`` of the nodes Ray is draining (``ray._private.state``);
    Ray Train's public ``get_preemption_info`` covers only the run's own nodes, from a worker."""
    import ray._private.state

    return dict(ray._private.state.state.get_draining_nodes() or {})


def ray_drain_node(gcs_address: str, node_id: str, reason: str, deadline_ms: int) -> tuple[bool, str]:
    """Drains a node for preemption, as the autoscaler does on a spot notice (tests and benches:
    ``ray drain-node`` does the same from a shell, seconds slower). Returns (accepted, why not)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    client = GcsClient(address=gcs_address)
    return client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), reason,
                             deadline_ms)


def ray_is_worker_process() -> bool:
    """Whether this process is a Ray worker process (not a driver): ``global_worker.mode``."""
    import ray
    import ray._private.worker

    return ray._private.worker.global_worker.mode == ray.WORKER_MODE


def ray_setup_hook_env(hook: str) -> dict[str, str]:
    """The runtime-env variable that makes Ray run ``hook`` (``module.function``) in each new
    worker process: what ``ray.init(runtime_env={"worker_process_setup_hook": ...})`` sets, which
    Ray accepts only for the whole job, not in Ray Train's ``worker_runtime_env``."""
    from ray._private import ray_constants

    return {ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR: hook}


RAY_TRAIN_WORKER_MODULE = "ray.train.v2._internal.execution.worker_group.worker"


def ray_preload_train_worker() -> None:
    """Imports the module that defines Ray Train's worker actor (what a new worker imports first)."""
    import importlib

    importlib.import_module(RAY_TRAIN_WORKER_MODULE)


def ray_runtime_env_hash(argv: list[str]) -> str:
    """The hash the raylet matches idle worker processes by: it starts each one with
    ``--runtime-env-hash`` (``ray/_private/workers/default_worker.py``). Asking Ray for the
    runtime env from a thread without a task crashes the process (Ray 2.60)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--runtime-env-hash="):
            return arg.split("=", 1)[1]
        if arg == "--runtime-env-hash" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def ray_prestart_workers(address: str, port: int, job_id_hex: str, runtime_env: str, n: int,
                         keep_alive_s: int) -> bool:
    """The raylet's ``PrestartWorkers`` gRPC call (what Ray itself uses for task backlogs):
    ``n`` idle worker processes for ``job_id_hex`` with ``runtime_env``. False when the node did
    not answer (going away); a refusal (no such method, authentication) raises."""
    import grpc
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.PYTHON, job_id=bytes.fromhex(job_id_hex), keep_alive_duration_secs=keep_alive_s,
        num_workers=n,
    )
    request.runtime_env_info.serialized_runtime_env = runtime_env
    with grpc.insecure_channel(f"{address}:{port}") as channel:
        try:
            node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise
    return True


def ray_dashboard_up() -> bool:
    """Whether the connected Ray serves its dashboard (and with it the state API): the node's
    ``address_info["webui_url"]`` (``ray._private.worker.global_worker.node``); unknown: yes."""
    try:
        import ray._private.worker

        return bool(ray._private.worker.global_worker.node.address_info.get("webui_url"))
    except Exception:  # noqa: BLE001 - not connected, or another layout: assume the default
        return True


def ray_lean_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (a ``TorchTrainer``) without two of Ray Train's default controller
    callbacks that cost a restart seconds and give a trainkit job nothing, by overriding the
    private ``_create_default_callbacks`` (Ray 2.60 has no switch for either):

    * ``DatasetsCallback`` without Ray Datasets: it still starts a ``DatasetManager`` actor,
      a Python process importing Ray Data, at every worker-group start, i.e. every restart;
    * ``PlacementGroupCleanerCallback`` on a Ray without a dashboard: it polls the state API,
      which needs the dashboard, and only logs a failure every second."""

    class LeanTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            drop = set() if self.datasets else {"DatasetsCallback"}
            if not ray_dashboard_up():
                drop.add("PlacementGroupCleanerCallback")
            return [c for c in callbacks if type(c).__name__ not in drop]

    LeanTrainer.__name__ = LeanTrainer.__qualname__ = f"Lean{trainer_cls.__name__}"
    return LeanTrainer


RAY_PRIVATE_NAMES = (
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER",
    "ray.train.TrainContext.get_storage (DeveloperAPI) -> StorageContext.experiment_fs_path, .storage_filesystem",
    "ray.experimental.internal_kv._internal_kv_put/_get/_del/_list",
    "ray._raylet.GcsClient.internal_kv_put/get/del/keys, .drain_node",
    "ray.core.generated.autoscaler_pb2.DrainNodeReason",
    "ray._private.state.state.get_draining_nodes",
    "ray._private.worker.global_worker.mode",
    "ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR",
    RAY_TRAIN_WORKER_MODULE,
    "--runtime-env-hash (default_worker.py argument)",
    "ray.core.generated.node_manager_pb2(_grpc).PrestartWorkers, common_pb2.PYTHON",
    "ray._private.worker.global_worker.node.address_info['webui_url']",
    "DataParallelTrainer._create_default_callbacks (DatasetsCallback, PlacementGroupCleanerCallback)",
    "ray.train.v2.torch.torchft_config.TorchftConfig, _TorchftBackend._maybe_create_lighthouse_actor, "
    "LighthouseServerActor",
    "ray.train.v2._internal.constants.TORCHFT_LIGHTHOUSE_ADDR_ENV_VAR",
)


@functools.cache
def ray_torchft_config() -> Any:
    """Ray Train's ``TorchftConfig`` (``ray.train.v2.torch.torchft_config``; Ray 2.60 does not
    export it from ``ray.train.torch``), with its lighthouse actor asking for no CPU.

    Its backend starts the lighthouse (``_TorchftBackend._maybe_create_lighthouse_actor``) as an
    actor pinned to the controller's node with Ray's default of 1 CPU; on a cluster whose head
    has none (trainkit's loopback cluster, a head kept free of training) it is never scheduled
    and ``fit()`` fails ("The actor is not schedulable"). The lighthouse only answers RPCs, so
    the subclass asks for 0 CPUs, and sets ``RUST_LOG`` (default ``warn``) in the actor: its Rust
    side logs every quorum, one a step, at INFO, which Ray ships to the driver. ``lighthouse_kwargs``
    must name ``bind`` (Ray's default is every interface)."""
    import os

    import ray
    from ray.train.v2.torch import torchft_config as tf
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class Backend(tf._TorchftBackend):
        def _maybe_create_lighthouse_actor(self, backend_config: Any) -> str:
            if self.lighthouse_actor is None:
                here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
                quiet = {"env_vars": {"RUST_LOG": os.environ.get("RUST_LOG", "warn")}}
                self.lighthouse_actor = tf.LighthouseServerActor.options(
                    num_cpus=0, scheduling_strategy=here, runtime_env=quiet).remote(
                    lighthouse_kwargs=backend_config.lighthouse_kwargs)
            return ray.get(self.lighthouse_actor.address.remote())

    class TorchftConfig(tf.TorchftConfig):
        @property
        def backend_cls(self) -> Any:
            return Backend

    return TorchftConfig


def ray_torchft_lighthouse_env() -> str:
    """The environment variable in which Ray's TorchftConfig backend gives every worker the
    lighthouse's address (``ray.train.v2._internal.constants``; not exported)."""
    from ray.train.v2._internal.constants import TORCHFT_LIGHTHOUSE_ADDR_ENV_VAR

    return TORCHFT_LIGHTHOUSE_ADDR_ENV_VAR


def torchft_manager_bound_to(host: str) -> Any:
    """A context in which ``torchft.Manager(...)`` binds its ManagerServer to ``host``.

    torchft 0.2's Manager builds its server with a hard-coded wildcard bind (``[::]:port``)
    and takes the class from the module global ``torchft.manager.ManagerServer``; there is no
    argument for the address, so the global is swapped for the Manager's construction.
    """
    import contextlib

    import torchft.manager as manager_module

    @contextlib.contextmanager
    def bound() -> Any:
        original = manager_module.ManagerServer

        def server(*args: Any, bind: str, **kwargs: Any) -> Any:
            return original(*args, bind=f"{host}:{bind.rsplit(':', 1)[1]}", **kwargs)

        manager_module.ManagerServer = server
        try:
            yield
        finally:
            manager_module.ManagerServer = original

    return bound()
