"""``python -m trainkit.bench checkpoint [options]``: what checkpoints cost.

Two measurements:

* **save/load** (default): a stack of ``Linear`` layers + AdamW (one step taken, so both
  moments exist) whose full state is at least ``--state-gb`` GB (1 GB = 1e9 bytes), saved
  ``--repeats`` times through :class:`~trainkit.checkpoint.Checkpointer` in one process
  (no process group: the checkpointer degrades to single-process DCP). Reported:

  - in a training loop (real forward/backward/AdamW steps of that model, ``--batch`` rows;
    ``overlap_staging=True`` as ``trainkit.Run`` uses it): the time the loop is blocked
    (``save()`` plus the optimizer step's wait for the host copy) vs the save's total time
    until committed, and the step time with and without a save in flight. The first save of
    a checkpointer allocates its staging buffers and is reported apart;
  - idle async save (start of ``save()`` until committed: data, rank file, manifest,
    retention) and sync save (``async_save=False``);
  - save MB/s (until committed; retention runs after) vs a raw fsspec write of the same
    tensor bytes to the same store in as many files/threads as the checkpointer wrote data
    files (``--io-threads``), timed just before and just after the save (their mean is the
    baseline of that repeat: this VM's disk speed drifts), plus 1 and 4 files for context;
    on ``file://`` every raw write is fsync'd, as the checkpointer fsyncs local files;
  - load MB/s (``Checkpointer.load`` into the same state: ``verify="checksum"``, the
    default, checks every byte in the same pass; ``verify="size"`` only sizes) vs raw
    fsspec ``cat_file`` of the raw files with the same concurrency, read just before and
    after the loads, plus 1 and 4 threads;
  - diagnostics: torch's own ``dcp.save``/``dcp.load`` and CRC-32 over the same bytes.

  ``--store s3`` starts moto (:class:`~trainkit.testing.servers.S3Server`) on 127.0.0.1 and
  creates a bucket; ``--store file`` (default) uses a temporary directory; ``--url`` points
  at an existing root instead (a fresh sub-directory is used and removed afterwards).

* **kill/resume** (``--kill-resume``): seconds from a SIGKILL of the whole launch (process
  group) to the first step the relaunched run logs past the checkpoint it restored, and the
  steps lost; the same for a SIGTERM (graceful: exit code 75, no step lost).

A table goes to stdout, then one JSON line (``{"bench": "checkpoint", ...}``); ``--out
FILE.md`` appends a markdown section with the machine, the command and the raw figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from trainkit import rundir, storage
from trainkit.bench import report
from trainkit.checkpoint._dcp_io import is_data_file

MB = 1e6
GB = 1e9
RAW_PARALLEL_THREADS = 4


# -- the state -------------------------------------------------------------------------------

def build_state(state_gb: float, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A stack of square Linear layers + AdamW after one step: params + 2 moments >= state_gb GB."""
    target = state_gb * GB
    width = 4096 if target >= 256 * MB else 1024
    per_layer = 3 * 4 * (width * width + width)  # fp32 param + exp_avg + exp_avg_sq
    layers = max(1, math.ceil(target / per_layer))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the model + optimizer state (what the checkpoint holds)."""
    out = [t.detach() for t in model.state_dict().values()]
    for st in opt.state_dict()["state"].values():
        out += [v.detach() for v in st.values() if torch.is_tensor(v)]
    return out


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# -- raw fsspec baselines ----------------------------------------------------------------------

def raw_put(url: str, ts: list[torch.Tensor], files: int, *, fsync: bool = False) -> tuple[float, list[str]]:
    """Writes the bytes of ``ts`` as ``files`` objects under ``url``, one thread each.
    Returns (seconds, paths)."""
    fs, root = storage.filesystem(url)
    fs.makedirs(root, exist_ok=True)
    groups = storage.balance(ts, files, lambda t: t.numel() * t.element_size())
    paths = [f"{root.rstrip('/')}/raw_{i:03d}.bin" for i in range(len(groups))]

    def put(i: int) -> None:
        with fs.open(paths[i], "wb") as f:
            for t in groups[i]:
                f.write(_view(t))
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as ex:
        list(ex.map(put, range(len(groups))))
    return time.perf_counter() - t0, paths


def raw_get(url: str, paths: list[str]) -> tuple[float, int]:
    """Reads ``paths`` whole (``cat_file``), one thread each. Returns (seconds, bytes)."""
    fs, _ = storage.filesystem(url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(paths)) as ex:
        n = sum(len(b) for b in ex.map(fs.cat_file, paths))
    return time.perf_counter() - t0, n


def raw_get_into(url: str, paths: list[str]) -> float:
    """Reads ``paths`` into buffers allocated (and touched) beforehand, one thread each: the
    ceiling for a load, which reads into tensors that already exist."""
    fs, _ = storage.filesystem(url)
    sizes = [fs.size(p) for p in paths]
    bufs = [bytearray(b"\x01") * n for n in sizes]

    def read(i: int) -> None:
        view = memoryview(bufs[i])
        with fs.open(paths[i], "rb") as f:
            got = 0
            while got < sizes[i]:
                n = f.readinto(view[got:])
                if not n:
                    raise OSError(f"{paths[i]}: short read")
                got += n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(paths)) as ex:
        list(ex.map(read, range(len(paths))))
    return time.perf_counter() - t0


def _rm(url: str) -> None:
    fs, path = storage.filesystem(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    try:
        fs.invalidate_cache()
    except Exception:  # noqa: BLE001
        pass


def _plain_dcp(url: str, state: dict[str, Any], local: bool, *, load: bool) -> float:
    """Seconds for torch's own ``dcp.save`` / ``dcp.load`` (FsspecWriter/Reader, one thread)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from trainkit._compat import FsspecReader, FsspecWriter

    opts = storage.storage_options(url)
    sd = {k: v.state_dict() for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        if load:
            dcp.load(sd, storage_reader=FsspecReader(url, **opts), no_dist=True)
        else:
            dcp.save(sd, storage_writer=FsspecWriter(url, sync_files=local, thread_count=1, overwrite=True, **opts),
                     no_dist=True)
        return time.perf_counter() - t0


def _crc32_s(ts: list[torch.Tensor]) -> float:
    from trainkit.checkpoint._store import Crc32

    crc = Crc32()
    t0 = time.perf_counter()
    for t in ts:
        crc.update(_view(t))
    return time.perf_counter() - t0


# -- save / load -------------------------------------------------------------------------------

def _med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class _Trainer:
    """Real training steps on the bench model, stepping the optimizer the way ``trainkit.Run``
    does: after waiting for an overlapped checkpoint copy (``Checkpointer.staged``)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: int) -> None:
        self.model, self.opt = model, opt
        self.x = torch.randn(batch, model[0].in_features)

    def step(self, ck=None) -> tuple[float, float]:
        """(seconds for the step, seconds of it spent waiting for the checkpoint copy)."""
        t0 = time.perf_counter()
        self.model(self.x).pow(2).mean().backward()
        waited = ck.staged() if ck is not None else 0.0
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, waited


def _save_while_training(ck, trainer: _Trainer, step: int, state: dict[str, Any], baseline_steps: int = 3
                         ) -> dict[str, float]:
    """One save in the middle of a training loop: what the loop is blocked for (``save()``
    plus the optimizer step's wait for the copy), the save's total time until committed, and
    how much slower the steps that ran alongside the upload were."""
    base = [trainer.step(ck)[0] for _ in range(baseline_steps)]
    t0 = time.perf_counter()
    ck.save(step, state)
    in_save = time.perf_counter() - t0
    waited, during = 0.0, []
    while ck.in_flight:
        secs, w = trainer.step(ck)
        waited += w
        during.append(secs)
    ck.wait()
    return {"blocking_s": in_save + waited, "save_call_s": in_save, "staged_wait_s": waited,
            "total_s": ck.last_save_s, "step_s": _med(base),
            "step_during_save_s": _med(during) if during else float("nan"), "steps_during_save": len(during)}


def bench_save_load(root: str, state_gb: float = 1.0, repeats: int = 3, *, batch: int = 32, io_threads: int = 2,
                    log=print) -> dict[str, Any]:
    """Save/load figures for a ``state_gb`` GB model+AdamW state under ``root`` (a URL)."""
    from trainkit.checkpoint import Checkpointer, ModelOptimState

    root = root.rstrip("/")
    model, opt = build_state(state_gb)
    ts = state_tensors(model, opt)
    nbytes = _nbytes(ts)
    state = {"model": ModelOptimState(model, opt)}
    log(f"state: {len(list(model.children()))} x Linear({model[0].in_features}) + AdamW, "
        f"{nbytes / GB:.3f} GB in {len(ts)} tensors; store {root}; training batch {batch}")
    res: dict[str, Any] = {"store": storage.protocol(root), "root": root, "state_bytes": nbytes,
                           "tensors": len(ts), "repeats": repeats, "batch": batch, "io_threads": io_threads,
                           "runs": {}}
    runs = res["runs"]

    def add(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    local = storage.is_local(root)
    train_root, idle_root, sync_root, raw_root = f"{root}/train", f"{root}/idle", f"{root}/sync", f"{root}/raw"
    trainer = _Trainer(model, opt, batch)
    raw_dirs: dict[str, str] = {}

    def raw_fresh(kind: str, files: int) -> tuple[float, list[str]]:
        """A timed raw write into a new directory; then the previous one of this kind goes."""
        url = f"{raw_root}/{kind}-{uuid.uuid4().hex[:8]}"
        secs, written = raw_put(url, ts, files, fsync=local)
        if kind in raw_dirs:
            _rm(raw_dirs[kind])
        raw_dirs[kind] = url
        return secs, written

    ck_train = Checkpointer(train_root, overlap_staging=True, io_threads=io_threads)
    ck = Checkpointer(idle_root, io_threads=io_threads)
    ck_sync = Checkpointer(sync_root, async_save=False, io_threads=io_threads)
    data_files = 1
    try:
        # The first save of a checkpointer allocates its host staging buffers; every later
        # save copies into them. Measured once, then left out of the medians.
        first = _save_while_training(ck_train, trainer, 1, state)
        res["first_save"] = first
        log(f"  first save (allocates staging buffers): blocking {first['blocking_s']:.3f}s, "
            f"total {first['total_s']:.2f}s")
        for i in range(repeats):
            step = i + 2
            tr = _save_while_training(ck_train, trainer, step, state)
            for k, v in tr.items():
                add(f"train_{k}", v)

            # Each save and load is timed between two raw transfers of the same bytes, and
            # compared with their mean: this VM's disk speed drifts by 3x within a minute.
            # Raw writes, like checkpoints, go to new files while the previous ones still
            # exist (deleted after the timing, as retention does): writing over just-freed
            # page cache was up to 4x faster here and would flatter the baseline.
            before, paths = raw_fresh("a", data_files)
            ck.save(step, state)
            add("idle_blocking_s", ck.last_blocking_s)
            ck.wait()
            add("async_total_s", ck.last_save_s)
            fs, p = storage.filesystem(ck.store.step_url(step))
            data_files = max(1, sum(1 for f in fs.ls(p, detail=False) if is_data_file(f.rsplit("/", 1)[-1])))
            after, paths = raw_fresh("b", data_files)
            add("raw_put_s", (before + after) / 2)
            add("save_vs_raw", (before + after) / 2 / ck.last_save_s)

            ck_sync.save(step, state)
            add("sync_save_s", ck_sync.last_save_s)
            secs, one_path = raw_fresh("1", 1)
            add("raw_put_1_s", secs)
            secs, par_paths = raw_fresh("par", RAW_PARALLEL_THREADS)
            add("raw_put_par_s", secs)

            before, n = raw_get(raw_dirs["b"], paths)
            assert n == nbytes, (n, nbytes)
            t0 = time.perf_counter()
            got = ck.load(state)
            add("load_s", time.perf_counter() - t0)
            assert got == step, (got, step)
            ck_size = Checkpointer(idle_root, verify="size", io_threads=io_threads)
            t0 = time.perf_counter()
            ck_size.load(state)
            add("load_size_verify_s", time.perf_counter() - t0)
            ck_size.close()
            after, _ = raw_get(raw_dirs["b"], paths)
            add("raw_get_s", (before + after) / 2)
            add("load_vs_raw", (before + after) / 2 / runs["load_s"][-1])
            add("raw_get_into_s", raw_get_into(raw_dirs["b"], paths))
            add("raw_get_1_s", raw_get(raw_dirs["1"], one_path)[0])
            add("raw_get_par_s", raw_get(raw_dirs["par"], par_paths)[0])

            # Diagnostics: torch's own dcp.save/load on the same store (one writer thread, no
            # checksums, manifest, rank files or retention) and CRC-32 over the same bytes.
            plain = f"{root}/dcp_plain/{step}"
            add("dcp_plain_save_s", _plain_dcp(plain, state, local, load=False))
            add("dcp_plain_load_s", _plain_dcp(plain, state, local, load=True))
            _rm(f"{root}/dcp_plain")
            add("crc32_s", _crc32_s(ts))
            log(f"  repeat {i + 1}/{repeats}: in training: blocking {tr['blocking_s']:.3f}s of {tr['total_s']:.2f}s; "
                f"idle save {runs['async_total_s'][-1]:.2f}s ({runs['save_vs_raw'][-1]:.2f}x raw put), "
                f"load {runs['load_s'][-1]:.2f}s ({runs['load_vs_raw'][-1]:.2f}x raw get)")
    finally:
        ck_train.close()
        ck.close()
        ck_sync.close()
    res["dcp_data_files"] = data_files
    res["raw_parallel_threads"] = RAW_PARALLEL_THREADS
    m = {k: _med(v) for k, v in runs.items()}
    res["median"] = m

    def mbps(s: float) -> float:
        return nbytes / MB / s if s > 0 else float("nan")

    res["summary"] = {
        "blocking_s": m["train_blocking_s"],
        "blocking_total_s": m["train_total_s"],
        "blocking_ratio": m["train_blocking_s"] / m["train_total_s"],
        "step_s": m["train_step_s"],
        "step_during_save_s": m["train_step_during_save_s"],
        "async_total_s": m["async_total_s"],
        "save_mb_s": mbps(m["async_total_s"]),
        "sync_save_mb_s": mbps(m["sync_save_s"]),
        "raw_put_mb_s": mbps(m["raw_put_s"]),
        "raw_put_1_mb_s": mbps(m["raw_put_1_s"]),
        "raw_put_par_mb_s": mbps(m["raw_put_par_s"]),
        "save_vs_raw": m["save_vs_raw"],
        "load_mb_s": mbps(m["load_s"]),
        "load_size_verify_mb_s": mbps(m["load_size_verify_s"]),
        "raw_get_mb_s": mbps(m["raw_get_s"]),
        "raw_get_1_mb_s": mbps(m["raw_get_1_s"]),
        "raw_get_into_mb_s": mbps(m["raw_get_into_s"]),
        "load_vs_raw_into": mbps(m["load_s"]) / mbps(m["raw_get_into_s"]),
        "raw_get_par_mb_s": mbps(m["raw_get_par_s"]),
        "load_vs_raw": m["load_vs_raw"],
        "load_size_verify_vs_raw": mbps(m["load_size_verify_s"]) / mbps(m["raw_get_s"]),
        "dcp_plain_save_mb_s": mbps(m["dcp_plain_save_s"]),
        "dcp_plain_load_mb_s": mbps(m["dcp_plain_load_s"]),
        "crc32_mb_s": mbps(m["crc32_s"]),
    }
    return res


def save_load_table(res: dict[str, Any]) -> str:
    s, m = res["summary"], res["median"]
    n = res["state_bytes"]
    par = res["raw_parallel_threads"]
    files = res["dcp_data_files"]
    local = res["store"] in ("file", "local")
    sync = " + fsync" if local else ""

    def row(name: str, secs: float | None, mbs: float | None = None, note: str = "") -> list[Any]:
        return [name, None if secs is None else f"{secs:.3f}", None if mbs is None else f"{mbs:.1f}", note]

    caption = (f"checkpoint save/load, store={res['store']}, state={n / GB:.3f} GB ({res['tensors']} tensors), "
               f"{files} data file(s) per save, repeats={res['repeats']} (medians)")
    return caption + "\n" + report.table(["what", "seconds", "MB/s", "note"], [
        row("in training: loop blocked (save() + copy wait)", m["train_blocking_s"], None,
            f"{100 * s['blocking_ratio']:.2f}% of the save's total (goal <= 2%)"),
        row("in training: save() call alone", m["train_save_call_s"]),
        row("in training: save total, until committed", m["train_total_s"], n / MB / m["train_total_s"],
            "upload shares the CPU with training"),
        row("in training: step time without / during the save", m["train_step_s"], None,
            f"{m['train_step_during_save_s']:.3f}s during (batch {res['batch']})"),
        row("idle async save, until committed", m["async_total_s"], s["save_mb_s"],
            f"{s['save_vs_raw']:.2f}x raw put, same files (goal >= 0.8x)"),
        row("idle async save: save() blocked (host copy)", m["idle_blocking_s"]),
        row("sync save (async_save=False)", m["sync_save_s"], s["sync_save_mb_s"]),
        row(f"raw fsspec write, {files} file(s)/thread(s){sync}", m["raw_put_s"], s["raw_put_mb_s"],
            "baseline for save: mean of the writes just before and after it"),
        row(f"raw fsspec write, 1 file{sync}", m["raw_put_1_s"], s["raw_put_1_mb_s"]),
        row(f"raw fsspec write, {par} files/threads{sync}", m["raw_put_par_s"], s["raw_put_par_mb_s"],
            "parallel ceiling"),
        row("load (verify=checksum, default)", m["load_s"], s["load_mb_s"],
            f"{s['load_vs_raw']:.2f}x raw get, same files (goal >= 0.8x)"),
        row("load (verify=size)", m["load_size_verify_s"], s["load_size_verify_mb_s"],
            f"{s['load_size_verify_vs_raw']:.2f}x raw get"),
        row(f"raw fsspec cat_file, {files} file(s)/thread(s)", m["raw_get_s"], s["raw_get_mb_s"],
            "baseline for load: mean of the reads just before and after it"),
        row("raw fsspec cat_file, 1 file", m["raw_get_1_s"], s["raw_get_1_mb_s"]),
        row(f"raw readinto existing buffers, {files} file(s)/thread(s)", m["raw_get_into_s"], s["raw_get_into_mb_s"],
            f"load is {s['load_vs_raw_into']:.2f}x this (no allocation in either)"),
        row(f"raw fsspec cat_file, {par} files/threads", m["raw_get_par_s"], s["raw_get_par_mb_s"],
            "parallel ceiling"),
        row("diag: torch's dcp.save (FsspecWriter, 1 thread)", m["dcp_plain_save_s"], s["dcp_plain_save_mb_s"],
            "no checksums/manifest"),
        row("diag: torch's dcp.load (FsspecReader)", m["dcp_plain_load_s"], s["dcp_plain_load_mb_s"]),
        row("diag: CRC-32 over the same bytes", m["crc32_s"], s["crc32_mb_s"], "in memory"),
    ], align="lrrl")


# -- kill / resume ------------------------------------------------------------------------------

LAUNCH = ["recipe=resnet", "strategy=ddp", "launcher.workers=2", "trainer.log_every=1",
          "trainer.progress=plain", "checkpoint.every_steps=5"]


def _last_step(run_dir: Path) -> int:
    return max((r.get("step", 0) for r in rundir.read_metrics(str(run_dir))), default=0)


def _restores(run_dir: Path) -> list[dict[str, Any]]:
    return rundir.of(rundir.read_events(str(run_dir)), rundir.RESTORE)


def bench_kill_resume(repeats: int = 3, *, workdir: str | None = None, kill_after: int = 12,
                      max_steps: int = 200, overrides: list[str] | None = None, timeout: float = 180.0,
                      log=print) -> dict[str, Any]:
    """Kill -> first resumed step, for SIGKILL (whole process group) and SIGTERM (launcher).

    One run, relaunched after each fault: ``repeats`` SIGKILLs, then ``repeats`` SIGTERMs,
    each ``kill_after`` steps after the previous restore (the first at step ``kill_after``).
    """
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="trainkit-killbench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINKIT_STORE": str(tmp / "store")}
    base = [sys.executable, "-m", "trainkit.launch", *LAUNCH, *(overrides or [])]
    launch_log = tmp / "launch.log"
    run_dir = tmp / "run"
    cmd = [*base, f"trainer.max_steps={max_steps}", f"run_dir={run_dir}"]
    res: dict[str, Any] = {"command": shlex.join(cmd[1:]), "kill_after": kill_after, "workdir": str(tmp),
                           "events": []}

    def start(c: list[str]) -> subprocess.Popen[bytes]:
        with open(launch_log, "ab") as f:
            return subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    # Warm-up: prepares the data set in the store (and warms imports / page cache).
    t0 = time.perf_counter()
    warm = start([*base, "trainer.max_steps=1", f"run_dir={tmp / 'warmup'}"])
    if warm.wait(timeout) != 0:
        raise RuntimeError(f"warm-up launch failed ({warm.returncode}); see {launch_log}")
    res["warmup_s"] = time.perf_counter() - t0
    log(f"warm-up launch (data preparation): {res['warmup_s']:.1f}s")

    proc = start(cmd)
    t_launch = time.perf_counter()
    restored = 0
    try:
        for i, kind in enumerate(["SIGKILL"] * repeats + ["SIGTERM"] * repeats):
            target = restored + kill_after
            deadline = time.monotonic() + timeout
            while _last_step(run_dir) < target:
                if proc.poll() is not None:
                    raise RuntimeError(f"launch exited ({proc.returncode}) before step {target}; see {launch_log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"step {target} not reached in {timeout}s; see {launch_log}")
                time.sleep(0.01)
            if i == 0:
                res["fresh_start_to_step_s"] = time.perf_counter() - t_launch
            seen = _last_step(run_dir)
            n_restores = len(_restores(run_dir))
            t_kill = time.perf_counter()
            wall_kill = time.time()
            if kind == "SIGKILL":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout)
            t_exit = time.perf_counter()
            if kind == "SIGKILL":
                try:  # nothing of the old group may outlive it
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            last_logged = _last_step(run_dir)
            proc = start(cmd)
            t_relaunch = time.perf_counter()
            deadline = time.monotonic() + timeout
            rest: dict[str, Any] | None = None
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"relaunch exited ({proc.returncode}); see {launch_log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no resumed step in {timeout}s; see {launch_log}")
                if rest is None:
                    rs = _restores(run_dir)
                    if len(rs) > n_restores:
                        rest = rs[-1]
                # the restore truncates metrics.jsonl to <= restored step before the event
                if rest is not None and _last_step(run_dir) > int(rest["step"]):
                    break
                time.sleep(0.01)
            t_first = time.perf_counter()
            restored = int(rest["step"])
            ev = {
                "signal": kind, "step_seen": seen, "last_logged_step": last_logged, "exit_code": rc,
                "restored_step": restored, "steps_lost": last_logged - restored,
                "kill_to_first_step_s": t_first - t_kill,
                "kill_to_exit_s": t_exit - t_kill,
                "relaunch_to_restore_s": float(rest["time"]) - wall_kill - (t_relaunch - t_kill),
                "relaunch_to_first_step_s": t_first - t_relaunch,
            }
            res["events"].append(ev)
            log(f"  {kind}: at step {last_logged} (exit {rc}, {ev['kill_to_exit_s']:.2f}s), restored {restored} "
                f"(lost {ev['steps_lost']}), first resumed step {ev['kill_to_first_step_s']:.2f}s after the signal")
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)
    for kind in ("SIGKILL", "SIGTERM"):
        evs = [e for e in res["events"] if e["signal"] == kind]
        res[kind] = {
            "n": len(evs),
            "median_kill_to_first_step_s": _med([e["kill_to_first_step_s"] for e in evs]),
            "median_steps_lost": _med([e["steps_lost"] for e in evs]),
            "max_steps_lost": max((e["steps_lost"] for e in evs), default=None),
            "median_kill_to_exit_s": _med([e["kill_to_exit_s"] for e in evs]),
            "median_relaunch_to_restore_s": _med([e["relaunch_to_restore_s"] for e in evs]),
            "exit_codes": sorted({e["exit_code"] for e in evs}),
        }
    if not workdir:
        shutil.rmtree(tmp, ignore_errors=True)
        res["workdir"] = None
    return res


def kill_resume_table(res: dict[str, Any]) -> str:
    medians = [[kind, f"{r['median_kill_to_first_step_s']:.2f}", f"{r['median_kill_to_exit_s']:.2f}",
                f"{r['median_relaunch_to_restore_s']:.2f}", f"{r['median_steps_lost']:g} / {r['max_steps_lost']}",
                str(r["exit_codes"])]
               for kind, r in ((kind, res[kind]) for kind in ("SIGKILL", "SIGTERM"))]
    events = [[i, e["signal"], e["step_seen"], e["last_logged_step"], e["exit_code"], e["restored_step"],
               e["steps_lost"], f"{e['kill_to_first_step_s']:.2f}"] for i, e in enumerate(res["events"], 1)]
    return "\n".join([
        f"kill -> first resumed step (medians over {res['SIGKILL']['n']} SIGKILL + {res['SIGTERM']['n']} SIGTERM)",
        report.table(["signal", "kill->first resumed step s", "kill->exit s", "relaunch->restore s",
                      "steps lost (median/max)", "exit codes"], medians, align="lrrrrl"),
        "",
        report.table(["#", "signal", "step when signalled", "last logged", "exit", "restored", "lost",
                      "kill->first step s"], events, align="llrrrrrr"),
    ])


# -- report ------------------------------------------------------------------------------------

def _tables_md(tables: list[str]) -> list[str]:
    """Each table: its first line as a bold caption, the rest as markdown."""
    out = []
    for t in tables:
        caption, _, body = t.partition("\n")
        out.append(f"**{caption}**\n\n{body}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m trainkit.bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", choices=["file", "s3"], default="file")
    p.add_argument("--url", help="an existing root URL to write under (default: a temp dir, or moto for s3)")
    p.add_argument("--state-gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="rows per training step of the bench model")
    p.add_argument("--io-threads", type=int, default=2, help="the Checkpointer's io_threads")
    p.add_argument("--kill-resume", action="store_true", help="measure kill -> resume instead of save/load")
    p.add_argument("--kill-after", type=int, default=12, help="steps after the last restore to signal at")
    p.add_argument("--workdir", help="kill-resume: keep the runs here (default: a temp dir, removed)")
    p.add_argument("--out", help="append a markdown section with the results to this file")
    args = p.parse_args(argv)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "checkpoint",
        "mode": "kill-resume" if args.kill_resume else "save-load",
        "command": shlex.join(["python", "-m", "trainkit.bench", "checkpoint", *argv]),
        "date": report.now(),
        "machine": report.machine(),
    }
    tables: list[str] = []
    if args.kill_resume:
        r = bench_kill_resume(args.repeats, workdir=args.workdir, kill_after=args.kill_after)
        result["kill_resume"] = r
        tables.append(kill_resume_table(r))
    else:
        server = None
        tmpdir = None
        try:
            if args.url:
                root = storage.join(args.url, f"trainkit-ckpt-bench-{uuid.uuid4().hex[:8]}")
            elif args.store == "s3":
                from trainkit.testing.servers import S3Server

                server = S3Server().start()
                storage.configure({"s3": server.storage_options})
                root = f"{server.bucket('trainkit-bench')}/ckpt"
            else:
                tmpdir = tempfile.mkdtemp(prefix="trainkit-ckpt-bench-")
                root = f"file://{tmpdir}"
            try:
                r = bench_save_load(root, args.state_gb, args.repeats, batch=args.batch, io_threads=args.io_threads)
            finally:
                if args.url:
                    _rm(root)
            result["save_load"] = r
            tables.append(save_load_table(r))
        finally:
            if server is not None:
                server.stop()
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - started
    result["load_avg_end"] = report.load_avg()
    print()
    for t in tables:
        print(t)
        print()
    print(json.dumps(result, default=str))
    if args.out:
        report.append(args.out, report.section(result["command"], result["machine"], _tables_md(tables), result,
                                               date=result["date"], wall_s=result["wall_s"],
                                               load_end=result["load_avg_end"]), "Checkpoint benchmarks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
