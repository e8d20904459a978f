"""Each private name trainkit._compat takes from a dependency still exists and behaves as
trainkit uses it: an upgrade that moves one fails here, by name."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch.distributed.checkpoint import StorageReader, StorageWriter

from trainkit import _compat


def test_fsspec_storage_classes_are_dcp_storage_layers(tmp_path):
    assert issubclass(_compat.FsspecWriter, StorageWriter) and issubclass(_compat.FsspecReader, StorageReader)
    writer = _compat.FsspecWriter(f"file://{tmp_path}/ckpt", thread_count=2)
    assert isinstance(writer.fs, _compat.FileSystem)
    assert _compat.FsspecReader(f"file://{tmp_path}/ckpt") is not None


def test_storage_info_fields_as_written():
    fields = [f.name for f in dataclasses.fields(_compat.StorageInfo)]
    assert fields[:3] == ["relative_path", "offset", "length"] and "transform_descriptors" in fields
    info = _compat.StorageInfo("f", 3, 4, transform_descriptors=["raw"])
    assert (info.relative_path, info.offset, info.length) == ("f", 3, 4)


def test_dcp_debug_loggers_are_found():
    loggers = _compat.dcp_debug_loggers()
    assert len(loggers) == 2 and all(isinstance(lg, logging.Logger) for lg in loggers)


def test_default_stager_keeps_its_copy_stream_where_read():
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
                                          use_non_blocking_copy=False))
    try:
        stream = _compat.staging_stream(stager)  # AttributeError here when torch renames it
        assert stream is None if not torch.accelerator.is_available() else isinstance(stream, torch.Stream)
    finally:
        stager.close()


def test_save_plans_are_cached_under_the_key_given_and_dropped_by_it():
    from torch.distributed.checkpoint.planner import SavePlanner

    state = {"w": torch.zeros(4, 2)}

    def plan(key):
        planner = _compat.caching_save_planner(key)
        planner.set_up_planner(state, None, True)
        local = planner.create_local_plan()
        delta, _ = planner.create_global_plan([local])
        planner.finish_plan(delta[0])
        return local

    try:
        assert plan("a").usable and not plan("a").usable  # the second local plan says "unchanged"
        assert plan("b").usable  # another key: its own cache
        assert all("a" in getattr(SavePlanner, name) for name in _compat._PLAN_CACHES)
        _compat.drop_save_plans("a")
        assert not any("a" in getattr(SavePlanner, name) for name in _compat._PLAN_CACHES)
        assert plan("a").usable
    finally:
        _compat.drop_save_plans("a")
        _compat.drop_save_plans("b")



def test_forked_child_cannot_unregister_the_parents_sockets():
    """A child closing a socket through its detached copy of a loop leaves the parent's epoll
    registration in place (without the detach it is removed and the parent never wakes)."""
    import asyncio
    import os
    import socket
    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    a, b = socket.socketpair()
    got = threading.Event()
    loop.call_soon_threadsafe(loop.add_reader, a.fileno(), lambda: (a.recv(1), got.set()))
    pid = os.fork()
    if pid == 0:  # child: what s3fs's finalizer does to an inherited connection
        try:
            _compat.detach_forked_loop(loop)
            assert not loop.is_running()
            loop._remove_reader(a.fileno())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    b.send(b"x")
    assert got.wait(5), "the parent's reader was unregistered by the child"
    loop.call_soon_threadsafe(loop.stop)
    assert _compat.fsspec_io_loop() is None or isinstance(_compat.fsspec_io_loop(), asyncio.AbstractEventLoop)


# -- Ray: every private name in _compat's Ray section (_compat.RAY_PRIVATE_NAMES) ------------


def test_ray_private_names_are_all_checked_here():
    """The list this file checks is the list _compat uses (a new name needs a test below)."""
    assert len(_compat.RAY_PRIVATE_NAMES) == 15


def test_ray_torchft_config_keeps_rays_backend_and_its_lighthouse_actor():
    import inspect

    from ray.train.torch import TorchConfig
    from ray.train.v2.torch import torchft_config as tf

    config = _compat.ray_torchft_config()(lighthouse_kwargs={"bind": "127.0.0.1:0", "min_replicas": 1},
                                          backend="gloo")
    assert isinstance(config, tf.TorchftConfig) and isinstance(config, TorchConfig)
    assert config.lighthouse_kwargs["bind"] == "127.0.0.1:0" and config.backend == "gloo"
    backend = config.backend_cls()
    assert isinstance(backend, tf._TorchftBackend) and backend.has_replica_groups and backend.lighthouse_actor is None
    # The method overridden, with the signature Ray calls it with, and the actor class it makes.
    assert list(inspect.signature(tf._TorchftBackend._maybe_create_lighthouse_actor).parameters) == [
        "self", "backend_config"]
    assert "lighthouse_kwargs" in inspect.signature(tf.LighthouseServerActor.__ray_metadata__.modified_class.__init__
                                                    ).parameters
    assert _compat.ray_torchft_config() is _compat.ray_torchft_config()


def test_ray_torchft_lighthouse_env_is_what_rays_backend_sets():
    import inspect

    from ray.train.v2.torch import torchft_config as tf

    name = _compat.ray_torchft_lighthouse_env()
    assert name == "TORCHFT_LIGHTHOUSE"
    # The backend's worker setup writes the lighthouse address under that name.
    assert "TORCHFT_LIGHTHOUSE_ADDR_ENV_VAR" in inspect.getsource(tf)


def test_ray_loopback_switch_is_where_ray_reads_it():
    import sys

    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    try:
        _compat.ray_keep_loopback()
        assert sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER is False
        assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def test_ray_train_storage_context_has_the_fields_read(tmp_path):
    import pyarrow.fs
    from ray.train import get_context  # noqa: F401 - v2's public entry point to the storage
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2.api.context import TrainContext

    assert callable(TrainContext.get_storage)
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp")
    assert storage.experiment_fs_path == str(tmp_path / "exp")
    assert isinstance(storage.storage_filesystem, pyarrow.fs.FileSystem)


def test_ray_worker_setup_hook_and_train_worker_module_exist():
    import importlib.util

    (key, value), = _compat.ray_setup_hook_env("pkg.mod.fn").items()
    assert key == "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR" and value == "pkg.mod.fn"
    assert importlib.util.find_spec(_compat.RAY_TRAIN_WORKER_MODULE) is not None


def test_ray_runtime_env_hash_is_a_worker_argument():
    from pathlib import Path

    import ray._private.workers.default_worker as worker_mod

    assert '"--runtime-env-hash"' in Path(worker_mod.__file__).read_text()
    assert _compat.ray_runtime_env_hash(["x", "--runtime-env-hash=123"]) == "123"
    assert _compat.ray_runtime_env_hash(["x", "--runtime-env-hash", "45"]) == "45"
    assert _compat.ray_runtime_env_hash(["x"]) == ""


def test_ray_prestart_workers_request_has_the_fields_set():
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    request = node_manager_pb2.PrestartWorkersRequest(language=common_pb2.PYTHON, job_id=b"\x01\x00\x00\x00",
                                                      keep_alive_duration_secs=5, num_workers=2)
    request.runtime_env_info.serialized_runtime_env = "{}"
    assert request.num_workers == 2
    assert hasattr(node_manager_pb2_grpc.NodeManagerServiceStub, "__init__")
    assert "PrestartWorkers" in node_manager_pb2.DESCRIPTOR.services_by_name["NodeManagerService"].methods_by_name


def test_ray_lean_trainer_drops_only_the_two_callbacks_it_names():
    import inspect

    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    source = inspect.getsource(DataParallelTrainer._create_default_callbacks)
    assert "DatasetsCallback(" in source and "PlacementGroupCleanerCallback()" in source
    lean = _compat.ray_lean_trainer(TorchTrainer)
    assert issubclass(lean, TorchTrainer) and lean.__name__ == "LeanTorchTrainer"

    class DatasetsCallback: ...

    class PlacementGroupCleanerCallback: ...

    class BackendSetupCallback: ...

    class Base:
        datasets: dict = {}

        def _create_default_callbacks(self):
            return [DatasetsCallback(), PlacementGroupCleanerCallback(), BackendSetupCallback()]

    kept = [type(c).__name__ for c in _compat.ray_lean_trainer(Base)()._create_default_callbacks()]
    assert kept == (["BackendSetupCallback"] if not _compat.ray_dashboard_up()
                    else ["PlacementGroupCleanerCallback", "BackendSetupCallback"])


@pytest.fixture(scope="module")
def ray_two_nodes():
    """A head and one worker node on 127.0.0.1 (a drain needs a node that is not the head)."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _compat.ray_keep_loopback()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    args = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**args, "num_cpus": 0, "include_dashboard": False})
    node = cluster.add_node(**args, num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        yield cluster, node
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_kv_drain_and_worker_mode_on_a_live_cluster(ray_two_nodes):
    import time

    cluster, node = ray_two_nodes
    inside, outside = _compat.RayKV("trainkit-test"), _compat.RayKV("trainkit-test", cluster.address)
    inside.put(b"job/a", b"1")
    assert outside.keys(b"job/") == [b"job/a"] and outside.get(b"job/a") == b"1"
    outside.put(b"job/b", b"2")
    assert sorted(inside.keys(b"job/")) == [b"job/a", b"job/b"] and inside.get(b"job/b") == b"2"
    inside.delete(b"job/a")
    outside.delete(b"job/b")
    assert inside.keys(b"job/") == [] and inside.get(b"job/a") is None
    import ray

    assert _compat.ray_is_worker_process() is False  # a driver
    assert _compat.ray_dashboard_up() is False  # the fixture's head has none
    # An actor on the node: its answer, and the work that keeps a drained node from leaving at once.
    class WorkerMode:  # defined here, so Ray ships it by value
        def mode(self) -> bool:
            from trainkit import _compat

            return _compat.ray_is_worker_process()

    busy = ray.remote(num_cpus=1)(WorkerMode).remote()
    assert ray.get(busy.mode.remote(), timeout=120) is True
    assert _compat.ray_draining_nodes() == {}
    deadline = int((time.time() + 60) * 1000)
    ok, why = _compat.ray_drain_node(cluster.address, node.node_id, "compat test", deadline)
    assert ok, why
    draining = _compat.ray_draining_nodes()
    assert list(draining) == [node.node_id] and abs(draining[node.node_id] - deadline) <= 1000, (draining, deadline)


def test_torchft_manager_server_binds_where_told():
    """The swapped global is the one Manager uses, and its server then listens on loopback only."""
    import datetime

    import psutil
    import torchft.manager
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft._torchft import ManagerServer
    from torchft.coordination import LighthouseServer

    assert torchft.manager.ManagerServer is ManagerServer
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    before = {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    with _compat.torchft_manager_bound_to("127.0.0.1"):
        manager = Manager(pg=ProcessGroupGloo(), load_state_dict=None, state_dict=None, min_replica_size=1,
                          rank=0, world_size=1, store_addr="127.0.0.1", store_port=store.port,
                          lighthouse_addr=f"http://127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}",
                          replica_id="compat", hostname="127.0.0.1",
                          connect_timeout=datetime.timedelta(seconds=10))
    try:
        assert torchft.manager.ManagerServer is ManagerServer
        # The address the Manager published for its group (its checkpoint transport is another server).
        port = int(store.get(torchft.manager.MANAGER_ADDR_KEY).decode().rsplit(":", 1)[1])
        opened = {c.laddr for c in psutil.Process().net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN} - before
        assert {addr.ip for addr in opened if addr.port == port} == {"127.0.0.1"}, opened
    finally:
        manager.shutdown(wait=False)
        lighthouse.shutdown()
