"""Checkpoints on object stores (moto S3, fake-gcs, Azurite), under injected faults, and under SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse

import pytest
import torch

import ckpt_mp
from test_checkpoint_local import make, same, seed_all, snapshot, state_of, step
from trainkit import storage
from trainkit.checkpoint import Checkpointer, load_for_export
from trainkit.errors import StorageError


@pytest.fixture
def store_options():
    """storage.configure for one test, restored afterwards."""
    saved = storage.configured()
    yield storage.configure
    storage.configure(saved)


def _roundtrip(url: str) -> None:
    model, opt = make()
    seed_all(0)
    snaps = {}
    with Checkpointer(url, keep_last=2) as ck:
        for s in range(1, 4):
            step(model, opt)
            ck.save(s, state_of(model, opt, {"step": s}))
            snaps[s] = snapshot(model, opt)
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    assert names == {"latest", "step_000000002", "step_000000003"}
    model2, opt2 = make(seed=7)
    meta = {"step": 0}
    ck2 = Checkpointer(url)
    assert ck2.steps() == [2, 3]
    assert ck2.load(state_of(model2, opt2, meta)) == 3 and meta["step"] == 3
    assert same(snaps[3], snapshot(model2, opt2))
    assert load_for_export(url, prefix="app.model.").keys() == model.state_dict().keys()


def test_s3_roundtrip(s3_server, s3_url, store_options):
    store_options({"s3": s3_server.storage_options})
    _roundtrip(s3_url)


def test_gcs_roundtrip(gcs_server, gcs_url, store_options):
    store_options({"gs": gcs_server.storage_options})
    _roundtrip(gcs_url)


def test_azure_roundtrip(azurite_server, az_url, store_options):
    store_options({"az": azurite_server.storage_options})
    _roundtrip(az_url)


def test_azure_commits_the_manifest_last_and_resumes(azurite_server, az_url, fault_proxy, store_options):
    """Through a proxy that records every upload (and resets the first manifest upload): the
    manifest goes up after every file of its step, ``latest`` after the manifest; a step
    directory left without a manifest is not a checkpoint; the committed step loads exactly,
    from an ``abfs://`` URL too (the same options serve both)."""
    puts: list[str] = []

    def record(n: int, method: str, path: str) -> str | None:
        puts.append(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        return "reset" if puts[-1].endswith("/step_000000001/manifest.json") and len(
            [p for p in puts if p.endswith("manifest.json")]) == 1 else None

    proxy = fault_proxy(azurite_server.endpoint, schedule=record, methods=["PUT"])
    store_options({"az": azurite_server.options_for(proxy.endpoint)})
    model, opt = make()
    seed_all(0)
    step(model, opt)
    with Checkpointer(az_url) as ck:
        ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    saved = snapshot(model, opt)
    assert proxy.counts["reset"] == 1
    data = [k for k, p in enumerate(puts) if "/step_000000001/" in p and not p.endswith("/manifest.json")]
    manifest = [k for k, p in enumerate(puts) if p.endswith("/step_000000001/manifest.json")]
    latest = [k for k, p in enumerate(puts) if p.endswith("/latest")]
    assert len(data) >= 2 and len(manifest) == 2 and latest  # the reset manifest upload was repeated
    assert max(data) < manifest[0] and manifest[-1] < latest[0]
    fs, root = storage.filesystem(az_url)
    fs.pipe_file(f"{root}/step_000000002/__0_0.distcp", b"torn")  # a save killed before its manifest
    for url in (az_url, "abfs://" + az_url.removeprefix("az://")):
        reader = Checkpointer(url)
        assert reader.steps() == [1]
        model2, opt2 = make(seed=5)
        meta = {"step": -1}
        with pytest.warns(UserWarning, match=r"ignoring uncommitted checkpoint dir\(s\) \['step_000000002'\]"):
            assert reader.load(state_of(model2, opt2, meta)) == 1 and meta["step"] == 1
        assert same(saved, snapshot(model2, opt2))
        reader.close()


def _few_client_retries(options: dict, attempts: int) -> dict:
    """botocore retries on its own; with fewer, trainkit's retry layers do the work."""
    return {**options, "config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"}}}


def test_every_committed_checkpoint_loads_under_10pct_faults(s3_server, s3_url, fault_proxy, store_options):
    proxy = fault_proxy(p_503=0.05, p_reset=0.05, seed=3)
    store_options({"s3": _few_client_retries(s3_server.options_for(proxy.endpoint), 2)})
    model, opt = make()
    seed_all(0)
    snaps, failed = {}, []
    ck = Checkpointer(s3_url, keep_last=10)
    for s in range(1, 7):
        step(model, opt)
        snaps[s] = snapshot(model, opt)
        try:
            ck.save(s, state_of(model, opt, {"step": s}))
            ck.wait()
        except StorageError as exc:  # allowed: a save may give up; it must then not be committed
            failed.append((s, str(exc)))
    ck.close()
    assert proxy.injected > 0
    # read back straight from the server, no faults
    store_options({"s3": s3_server.storage_options})
    reader = Checkpointer(s3_url)
    committed = reader.steps()
    assert len(committed) >= 4, (committed, failed)
    assert not set(committed) & {s for s, _ in failed}
    for s in committed:
        model2, opt2 = make(seed=11)
        meta = {"step": -1}
        assert reader.load(state_of(model2, opt2, meta), step=s) == s
        assert meta["step"] == s and same(snaps[s], snapshot(model2, opt2))


def test_save_retries_beyond_the_client(s3_server, s3_url, fault_proxy, store_options, caplog):
    from trainkit.testing.faultproxy import fail_first

    proxy = fault_proxy(schedule=fail_first(8, "reset"), methods=["PUT"])
    store_options({"s3": _few_client_retries(s3_server.options_for(proxy.endpoint), 1)})
    model, opt = make()
    with Checkpointer(s3_url) as ck:
        ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
        assert ck.steps() == [1]
    assert proxy.counts["reset"] == 8
    assert "transient store error" in caplog.text


def test_shipped_retries_save_and_load_through_faults(s3_server, s3_url, fault_proxy, store_options):
    """As shipped (botocore's and s3fs's own retries, then trainkit's): every save commits
    and every load is exact through 503s and resets on saves and loads alike."""
    proxy = fault_proxy(p_503=0.1, p_reset=0.05, seed=5)
    store_options({"s3": s3_server.options_for(proxy.endpoint)})
    model, opt = make()
    seed_all(0)
    snaps = {}
    with Checkpointer(s3_url, keep_last=3) as ck:
        for s in range(1, 4):
            step(model, opt)
            ck.save(s, state_of(model, opt, {"step": s}), blocking=True)
            snaps[s] = snapshot(model, opt)
        assert ck.commits == [1, 2, 3]
    reader = Checkpointer(s3_url)
    for s in (3, 1):
        model2, opt2 = make(seed=11)
        meta = {"step": -1}
        assert reader.load(state_of(model2, opt2, meta), step=s) == s
        assert meta["step"] == s and same(snaps[s], snapshot(model2, opt2))
    reader.close()
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0, proxy.counts


def test_a_permanent_error_is_not_retried_and_names_the_step(s3_server, s3_url, fault_proxy, store_options):
    """A data file whose bytes changed (same size, so the listing check passes) fails the
    load in the reader's checksum: permanent, so the load gives up after one pass, not after
    every attempt, with a StorageError naming the step's URL."""
    proxy = fault_proxy()
    store_options({"s3": s3_server.options_for(proxy.endpoint)})
    model, opt = make()
    with Checkpointer(s3_url) as ck:
        ck.save(1, state_of(model, opt, {"step": 1}), blocking=True)
    before = proxy.counts["requests"]
    with Checkpointer(s3_url) as ck:
        assert ck.load(state_of(*make(seed=3), {"step": -1}), step=1) == 1
    clean = proxy.counts["requests"] - before
    fs, path = s3_server.filesystem(skip_instance_cache=True), s3_url.removeprefix("s3://")
    data = sorted(fs.glob(f"{path}/step_000000001/__*.safetensors"), key=fs.size)[-1]
    blob = bytearray(fs.cat_file(data))
    blob[-2] ^= 0xFF  # in the last tensor's bytes (the header, at the front, is checked on its own)
    fs.pipe_file(data, bytes(blob))
    before = proxy.counts["requests"]
    with Checkpointer(s3_url) as ck:
        with pytest.raises(StorageError, match=rf"{s3_url}/step_000000001 skipped: .*checksum mismatch"):
            ck.load(state_of(*make(seed=3), {"step": -1}), step=1)
    assert proxy.counts["requests"] - before < 2 * clean, (clean, proxy.counts)


def test_sigkill_mid_save_leaves_previous_loadable(s3_server, s3_url, fault_proxy, store_options, tmp_path):
    proxy = fault_proxy(latency=0.1)  # a slow store: the kill lands inside the upload
    args = {"strategy": "single", "root": s3_url, "steps": 2, "save_at": [1, 2], "marker": True,
            "sleep_after_save": 30, "ballast_mb": 8, "out": str(tmp_path / "out"),
            "storage": {"s3": s3_server.options_for(proxy.endpoint)}}
    env = ckpt_mp.worker_env(0, 1, ckpt_mp.free_port())
    p = subprocess.Popen([sys.executable, str(ckpt_mp.WORKERS), "train", json.dumps(args)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ckpt_mp.REPO))
    try:
        deadline = time.monotonic() + 90
        seen = []
        for line in p.stdout:
            seen.append(line)
            if line.startswith("SAVING 2"):  # save(2) returned: step 1 committed, step 2 uploading
                break
            assert time.monotonic() < deadline, "".join(seen)[-3000:]
        else:
            pytest.fail("worker ended early:\n" + "".join(seen)[-3000:])
        # kill as soon as the first object of step 2 exists (more requests follow before a commit)
        fs, path = s3_server.filesystem(skip_instance_cache=True), s3_url.removeprefix("s3://")
        while not fs.glob(f"{path}/step_000000002/*"):
            assert time.monotonic() < deadline and p.poll() is None
            fs.invalidate_cache()
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    store_options({"s3": s3_server.storage_options})
    ck = Checkpointer(s3_url)
    assert ck.steps() == [1], "the interrupted save must not be committed"
    import ckpt_workers

    model, opt = ckpt_workers.build("single")
    meta = {"step": -1}
    state = state_of(model, opt, meta)
    state["ballast"] = {"w": torch.zeros(8 << 18)}
    with pytest.warns(UserWarning, match="uncommitted"):
        assert ck.load(state) == 1
    assert meta["step"] == 1
    # saving step 2 again commits cleanly over the leftovers
    ck.save(2, state, blocking=True)
    assert ck.steps() == [1, 2]
    ck.close()
