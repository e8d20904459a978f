"""Each private name trainkit._compat takes from a dependency still exists and behaves as
trainkit uses it: an upgrade that moves one fails here, by name."""

from __future__ import annotations

import dataclasses
import logging

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


def test_hydra_sweep_grid_expands_like_hydra():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=["a=1,2", "b=x", "c=range(0,2)"])
    assert _compat.hydra_sweep_grid(parsed) == [["a=1", "b=x", "c=0"], ["a=1", "b=x", "c=1"],
                                                ["a=2", "b=x", "c=0"], ["a=2", "b=x", "c=1"]]


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
