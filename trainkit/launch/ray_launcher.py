"""``launcher=ray``: the same training function on a Ray cluster, through Ray Train.

One ``TorchTrainer`` per run: Ray places ``launcher.workers`` actors, sets up the torch
process group (gloo or nccl) and calls :func:`ray_worker_main` in each, which runs
:func:`trainkit.train.train` exactly as the local launcher's workers do. Fault tolerance is
Ray's: a lost worker or node fails the group, Ray's failure policy restarts it (up to
``launcher.max_failures``, -1 for ever) and the restarted workers call ``train`` again, whose
``Run.restore`` loads trainkit's latest committed checkpoint from the same ``run_dir``.
Ray's own checkpoint bookkeeping is not used: trainkit's ``latest`` pointer is the truth.

Preemption on Ray reaches the same stop path as a SIGTERM on a VM:

* a Ray node drain (spot reclaim seen by the autoscaler, ``ray drain-node``, KubeRay scale
  down) is polled in each worker - Ray Train's own watcher pushes it into the train context,
  and the GCS draining-node table is read directly as a fallback - and handed to trainkit's
  PreemptionWatcher (``request(reason)``); the ranks agree on a step, save and leave with
  :class:`~trainkit.errors.Preempted` (75);
* a worker leaving with 75 (or any retryable error) fails the group and Ray restarts it; a
  75 is charged to Ray's preemption budget (``FailureConfig.max_preemption_failures``, -1),
  not to ``max_failures``;
* a trainkit error with exit code 2 (bad config or store) stops the job at once: retrying a
  deterministic error would loop for ever with ``max_failures=-1``.

The driver's exit code matches the local launcher: 0 done, 1 failed, 2 config/store error.
``address=""`` starts a private Ray on 127.0.0.1 for the duration of the command;
``address=auto`` or ``ray://host:10001`` joins an existing cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from trainkit import storage
from trainkit.config import Config
from trainkit.errors import EXIT_PREEMPTED, ConfigError, Preempted, TrainkitError

EXIT_FAILED = 1
# An identical Python error from the training code this many times in a row stops the job.
CRASH_REPEATS = int(os.environ.get("TRAINKIT_RAY_CRASH_REPEATS", 3))
# Environment the workers need to find the same stores as the driver (not credentials:
# those come from the node's role / service account, see docs/clusters.md).
PROPAGATE_PREFIXES = ("TRAINKIT_", "FSSPEC_", "GCSFS_", "STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL")
LOOPBACK = ("127.0.0.1", "localhost")
# GCS settings for a cluster whose nodes vanish (spot): a node that stops answering is
# declared dead after ~3 failed 1 s checks instead of Ray's 5 x 3 s (up to 5 x 10 s for a
# VM that no longer answers at all). Until then Ray Train's restart waits on the dead
# workers' RPCs and object pulls may wait on the dead node. Pass it to the head's
# ``ray start --system-config`` (launchers/*-spot.yaml do); the spot bench's cluster uses it.
SPOT_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                      "health_check_failure_threshold": 3}


# -- the worker side ------------------------------------------------------------------------


class WorkerExit(Exception):
    """A worker's outcome that the driver and Ray's failure policy must tell apart.

    ``exit_code`` as the local launcher would have seen it: 75 preempted, 2 config/store,
    1 anything else trainkit reported. Picklable (Ray sends it to the controller).
    """

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(exit_code, message)
        self.exit_code = exit_code
        self.message = message

    def __str__(self) -> str:
        return f"[exit {self.exit_code}] {self.message}"


def ray_worker_main(cfg_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function: :func:`trainkit.train.train` plus a drain watch."""
    from trainkit.launch.worker import _is_peer_loss
    from trainkit.train import train

    cfg_dict = dict(cfg_dict)
    if threading.current_thread() is not threading.main_thread():
        # Ray Train runs us in a thread, where Python cannot install signal handlers; a
        # Ray worker learns of a drain from the GCS instead (DrainWatch below).
        cfg_dict["preemption"] = {**cfg_dict.get("preemption", {}), "signals": []}
    poll = float(cfg_dict.get("preemption", {}).get("poll_seconds", 5.0) or 5.0)
    watch = DrainWatch(gcs_poll_seconds=poll)
    watch.start()
    from trainkit.launch.warm_pool import publish_runtime_env

    publish_runtime_env()
    if os.environ.get("RANK", "0") != "0":
        # Ray shows every worker's INFO records; one rank's checkpoint lines are enough.
        logging.getLogger("trainkit").setLevel(logging.WARNING)
    try:
        summary = train(cfg_dict)
    except Preempted as exc:
        raise WorkerExit(EXIT_PREEMPTED, str(exc)) from None
    except TrainkitError as exc:
        raise WorkerExit(exc.exit_code, f"trainkit: {exc}") from None
    except RuntimeError as exc:
        if _is_peer_loss(exc):
            raise WorkerExit(EXIT_FAILED, f"lost a peer worker ({str(exc).splitlines()[0]})") from None
        raise
    finally:
        watch.stop()
    return _jsonable(summary) if isinstance(summary, dict) else None


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, default=str))


class DrainWatch:
    """Polls whether this worker's Ray node (or any node of its group) is being drained.

    Two sources, both reachable from a worker in Ray 2.60:

    1. Ray Train v2's PreemptionWatcher actor polls the GCS drain table for the group's
       nodes and calls ``mark_preempt`` on every worker, which stores a ``PreemptionInfo``
       in the worker's train context; we read that attribute (no collective, unlike
       ``ray.train.get_preemption_info()``, which is a barrier and cannot run in a thread).
    2. ``ray._private.state.state.get_draining_nodes()`` (``{node_id_hex: deadline_ms}``),
       the same table, read directly for this worker's node: covers Ray versions or
       settings without the watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``).

    On a drain it asks trainkit's PreemptionWatcher to stop (:func:`request_stop`).
    """

    def __init__(self, poll_seconds: float = 0.5, gcs_poll_seconds: float = 5.0) -> None:
        # Reading the train context is an attribute lookup; the GCS is asked less often.
        self.poll_seconds = poll_seconds
        self.gcs_poll_seconds = gcs_poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trainkit-ray-drain", daemon=True)
        self.reason: str | None = None
        self._context: Any = None
        self._node_id: str | None = None
        self._last_gcs = 0.0

    def start(self) -> None:
        try:
            import ray

            if not ray.is_initialized():  # not in a Ray worker: nothing to watch (and no ray.init)
                return
            self._node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - not in a Ray worker: nothing to watch
            return
        with contextlib.suppress(Exception):
            from ray.train.v2._internal.execution.context import get_train_context

            self._context = get_train_context()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> str | None:
        """The drain reason, or None; one poll."""
        info = getattr(getattr(self._context, "preemption_context", None), "preemption_info", None)
        if info is not None:
            return _drain_reason(getattr(info, "preempted_node_ids", []), getattr(info, "deadline_ms", None))
        now = time.monotonic()
        if self._node_id and now - self._last_gcs >= self.gcs_poll_seconds:
            self._last_gcs = now
            try:
                import ray._private.state

                drained = ray._private.state.state.get_draining_nodes() or {}
            except Exception:  # noqa: BLE001 - a GCS hiccup: try again next poll
                return None
            if self._node_id in drained:
                return _drain_reason([self._node_id], drained[self._node_id] or None)
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            reason = self.check()
            if reason:
                self.reason = reason
                request_stop(reason)
                return


def _drain_reason(nodes: list[str], deadline_ms: int | None) -> str:
    left = f", {max(0.0, deadline_ms / 1000 - time.time()):.0f}s before the deadline" if deadline_ms else ""
    names = ", ".join(n[:8] for n in nodes) or "?"
    return f"ray node drain ({names}{left})"


def request_stop(reason: str) -> int:
    """Hands a stop request to every running PreemptionWatcher in this worker process."""
    from trainkit.preemption import request

    return request(reason)


# -- Ray's failure policy with trainkit's exit codes ------------------------------------------


def _worker_exits(error: Any) -> dict[int, WorkerExit | None]:
    """rank -> the WorkerExit it raised (None for any other failure, e.g. a dead actor)."""
    failures = getattr(error, "worker_failures", None) or {}
    out: dict[int, WorkerExit | None] = {}
    for rank, exc in failures.items():
        base = getattr(exc, "_base_exc", exc)
        out[rank] = base if isinstance(base, WorkerExit) else None
    return out


def _crash_signature(error: Any) -> tuple[str, ...] | None:
    """What a deterministic crash looks like: the same Python error from the training code.

    None when a worker or node died (a Ray error, not ours), the group was preempted, or
    the ranks only lost their peers: those are what restarts are for.
    """
    failures = getattr(error, "worker_failures", None) or {}
    sig = set()
    for exc in failures.values():
        base = getattr(exc, "_base_exc", None)
        if base is None:
            return None
        if isinstance(base, WorkerExit) and base.exit_code == EXIT_PREEMPTED:
            return None
        text = str(base).strip().splitlines()[0] if str(base).strip() else ""
        if "lost a peer" not in text:
            sig.add(f"{type(base).__name__}: {text[:200]}")
    return tuple(sorted(sig)) or None


def _make_failure_policy(failure_config: Any) -> Any:
    from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

    class TrainkitFailurePolicy(DefaultFailurePolicy):
        """Ray's default policy, except: exit 2 never retries; an all-75 group is a preemption."""

        _last_crash: tuple[str, ...] | None = None
        _repeats = 0

        def make_decision(self, training_failed_error: Any) -> Any:
            exits = _worker_exits(training_failed_error)
            if any(e is not None and e.exit_code == 2 for e in exits.values()):
                return FailureDecision.RAISE
            # The same Python error N times in a row is a bug, not bad luck: even with
            # max_failures=-1 (spot) do not loop on it for ever.
            crash = _crash_signature(training_failed_error)
            self._repeats = self._repeats + 1 if crash is not None and crash == self._last_crash else 1
            self._last_crash = crash
            if crash is not None and self._repeats >= CRASH_REPEATS:
                logging.getLogger(__name__).error(
                    "trainkit: the same error %d times in a row, giving up: %s", self._repeats, "; ".join(crash)
                )
                return FailureDecision.RAISE
            if exits and all(e is not None and e.exit_code == EXIT_PREEMPTED for e in exits.values()):
                self._preemption_failures += 1
                limit = self.failure_config.max_preemption_failures
                if limit != -1 and self._preemption_failures > limit:
                    return FailureDecision.RAISE
                logging.getLogger(__name__).info(
                    "trainkit: workers preempted (exit 75); restarting the group to resume"
                )
                return FailureDecision.RETRY
            return super().make_decision(training_failed_error)

    return TrainkitFailurePolicy(failure_config)


def _trainer_class() -> type:
    from ray.train.torch import TorchTrainer

    class TrainkitTorchTrainer(TorchTrainer):
        """TorchTrainer whose controller uses :func:`_make_failure_policy`."""

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if not self.datasets:
                # trainkit streams its own data; without Ray Datasets this callback would
                # still start a DatasetManager actor (one more Python process importing
                # Ray Data) on every worker-group start, i.e. on every restart.
                callbacks = [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]
            if not _dashboard_up():
                # It polls the state API, which needs the dashboard, and otherwise only logs
                # a warning every few seconds; a Ray without a dashboard is one we own.
                callbacks = [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]
            return callbacks

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = _make_failure_policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    return TrainkitTorchTrainer


# -- the driver side -------------------------------------------------------------------------


@dataclasses.dataclass
class TrialResult:
    """What one ``TorchTrainer.fit()`` ended with."""

    run_dir: str
    exit_code: int
    message: str = ""
    summary: dict[str, Any] | None = None
    wall_s: float = 0.0

    @property
    def status(self) -> str:
        return {0: "done", EXIT_PREEMPTED: "preempted", 2: "config error"}.get(self.exit_code, "failed")


def _ray_env() -> None:
    """Process-wide settings for our driver, before Ray is imported."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray would chdir workers into its own trial directory; paths are absolute anyway.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Identical lines from several workers stay separate lines, in order.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Rank 0's progress lines stay plain stdout lines instead of Ray Train's log records.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's drain watcher feeds DrainWatch; poll a little faster than its 5 s default.
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "2")
    # Ray Train's controller polls the worker group every 2 s by default, and a restart waits
    # for one poll (a lost node) or two (a drain: the notice, then the group's exit 75); a
    # poll is one small RPC per worker, so 0.5 s saves seconds per restart for little.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _host(address: str) -> str:
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def pin_loopback() -> None:
    """Keeps a Ray on this machine on 127.0.0.1 (listening, advertising, torch's MASTER_ADDR).

    Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the address of the machine's
    network interface unless its "no cluster" switch is off; with it, every Ray process
    (which inherits this environment) binds and advertises 127.0.0.1.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray._private.ray_constants" in sys.modules:  # imported already: the flag is read per call
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def warm_standby_on(lc: Any) -> bool:
    """Only on a cluster we join: a private local Ray has no spare node to restart on and no
    spare cores to import on. Over Ray Client the driver cannot reach the raylets."""
    return bool(lc.warm_standby > 0 and lc.address and not lc.address.startswith("ray://"))


@contextlib.contextmanager
def ray_session(address: str, *, cpus: float = 0.0, launcher: Any = None) -> Iterator[bool]:
    """Connects this process to Ray; yields True when we started (and will stop) it.

    ``address=""`` starts a private single-node Ray pinned to 127.0.0.1 with at least
    ``cpus`` logical CPUs (so ``workers=4`` works on a 2-core laptop as it does locally).
    An already-initialised Ray (a test, a notebook) is used as it is. With a
    ``launcher`` config whose ``warm_standby`` is on, the session keeps warm standby worker
    processes (:mod:`trainkit.launch.warm_pool`) for as long as it lasts.
    """
    _ray_env()
    loopback = not address or (not address.startswith("ray://") and _host(address) in LOOPBACK)
    if loopback:
        pin_loopback()
    import ray

    if ray.is_initialized():
        yield False
        return
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    warm = launcher is not None and warm_standby_on(launcher)
    if not address:
        # Token auth protects a cluster reachable from a network; this one listens on
        # loopback only and lives as long as the command.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local",  # a new cluster, even when one from `ray start` runs here
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=max(int(-(-cpus // 1)), os.cpu_count() or 1),
            object_store_memory=256 * 1024 * 1024,
            **quiet,
        )
        print(f"ray: started a local cluster on 127.0.0.1 ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)",
              flush=True)
    else:
        kwargs: dict[str, Any] = {}
        if loopback:
            kwargs["_node_ip_address"] = "127.0.0.1"
        try:
            ray.init(address=address, **kwargs, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"launcher.address={address}: cannot connect to Ray ({exc})") from exc
        print(f"ray: connected to {address} ({ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
              f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs)", flush=True)
    pool = None
    if warm:
        from trainkit.launch.warm_pool import WarmPool

        pool = WarmPool(workers=launcher.workers * launcher.nodes, cpus_per_worker=launcher.cpus_per_worker,
                        gpus_per_worker=launcher.gpus_per_worker, per_slot=launcher.warm_standby,
                        refill_after_s=launcher.warm_refill_s)
        pool.start()
    try:
        yield True
    finally:
        if pool is not None:
            pool.stop()
        with contextlib.suppress(Exception):
            ray.shutdown()


def worker_cfg(cfg: Config) -> dict[str, Any]:
    """The config the workers get: local paths absolute (workers may run elsewhere)."""
    data = cfg.to_dict()
    for key in ("run_dir",):
        if data[key] and storage.is_local(data[key]):
            data[key] = os.path.abspath(storage.local_path(data[key]))
    if data["data"]["cache_dir"] and storage.is_local(data["data"]["cache_dir"]):
        data["data"]["cache_dir"] = os.path.abspath(data["data"]["cache_dir"])
    if data["data"]["url"].startswith(("/", ".")):
        data["data"]["url"] = os.path.abspath(data["data"]["url"])
    # One process per worker: the launcher's "nodes" is Ray's business here.
    data["launcher"]["workers"] = cfg.launcher.workers * cfg.launcher.nodes
    data["launcher"]["nodes"] = 1
    return data


def ray_storage(run_dir: str) -> str:
    """Where Ray Train keeps its own run state (a marker file; we report no checkpoints)."""
    if storage.is_local(run_dir):
        return os.path.join(os.path.abspath(storage.local_path(run_dir)), "ray")
    digest = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "trainkit", "ray", digest)


def _propagated_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(PROPAGATE_PREFIXES)}
    if _driver_ip() in LOOPBACK:
        # A worker asks for "its" IP (torch's MASTER_ADDR) from the perspective of the
        # network, not of its raylet: on a loopback-pinned cluster that is the machine's
        # interface. This Ray switch makes it answer 127.0.0.1 (it only matters there).
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _driver_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return ""


def _dashboard_up() -> bool:
    """Whether Ray's state API (served by the dashboard) is there; unknown counts as yes."""
    try:
        import ray

        node = ray._private.worker.global_worker.node
        return bool(node.address_info.get("webui_url"))
    except Exception:  # noqa: BLE001
        return True


def build_trainer(cfg: Config, *, name: str = "trainkit") -> Any:
    _ray_env()
    from trainkit.launch.warm_pool import preload_env
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise ConfigError("launcher=ray needs Ray Train v2 (unset RAY_TRAIN_V2_ENABLED=0)")
    lc = cfg.launcher
    workers = lc.workers * lc.nodes
    resources: dict[str, float] = {"CPU": lc.cpus_per_worker}
    if lc.gpus_per_worker:
        resources["GPU"] = lc.gpus_per_worker
    backend = cfg.strategy.backend
    if backend == "auto":
        backend = "nccl" if lc.gpus_per_worker else "gloo"
    check_config(cfg)
    data = worker_cfg(cfg)
    return _trainer_class()(
        train_loop_per_worker=ray_worker_main,
        train_loop_config=data,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=lc.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=lc.placement_strategy,
        ),
        torch_config=TorchConfig(backend=backend, timeout_s=int(os.environ.get("TRAINKIT_PG_TIMEOUT", 600))),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage(data["run_dir"]),
            failure_config=FailureConfig(max_failures=lc.max_failures),
            worker_runtime_env={"env_vars": {**_propagated_env(), **(preload_env() if warm_standby_on(lc) else {})}},
        ),
    )


def fit(cfg: Config, *, name: str = "trainkit") -> TrialResult:
    """Runs one job with Ray Train on the connected cluster; never raises for a failed job."""
    from ray.train import TrainingFailedError

    run_dir = worker_cfg(cfg)["run_dir"]
    t0 = time.time()
    trainer = build_trainer(cfg, name=name)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        code, message = _explain(exc)
        return TrialResult(run_dir, code, message, read_summary(run_dir), time.time() - t0)
    summary = getattr(result, "return_value", None)
    if not isinstance(summary, dict):
        summary = read_summary(run_dir)
    return TrialResult(run_dir, 0, "", summary, time.time() - t0)


def _explain(exc: Exception) -> tuple[int, str]:
    """The job's exit code and one line: the first trainkit-reported worker error wins."""
    exits = _worker_exits(exc)
    known = sorted((r, e) for r, e in exits.items() if e is not None)
    if known:
        # A config/store error explains the others (peers then only lose a connection).
        rank, first = min(known, key=lambda re: (re[1].exit_code != 2, re[1].exit_code == EXIT_FAILED, re[0]))
        code = first.exit_code if first.exit_code in (2, EXIT_PREEMPTED) else EXIT_FAILED
        return code, f"worker rank {rank}: {first.message}"
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(getattr(err, "_base_exc", err)) or type(err).__name__
        return EXIT_FAILED, f"worker rank {rank}: {text.strip().splitlines()[-1]}"
    return EXIT_FAILED, str(exc).strip().splitlines()[-1]


def read_summary(run_dir: str) -> dict[str, Any] | None:
    try:
        fs, path = storage.filesystem(storage.join(run_dir, "summary.json"))
        if not fs.exists(path):
            return None
        return json.loads(fs.cat(path))
    except Exception:  # noqa: BLE001 - a missing summary is reported as such
        return None


PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_config(cfg: Config) -> None:
    """The Ray-specific checks that need no cluster."""
    lc = cfg.launcher
    if lc.placement_strategy not in PLACEMENT:
        raise ConfigError(f"launcher.placement_strategy={lc.placement_strategy!r} is not valid; "
                          f"valid: {', '.join(PLACEMENT)}")
    if cfg.strategy.backend == "nccl" and not lc.gpus_per_worker:
        raise ConfigError("strategy.backend=nccl needs GPU workers: set launcher.gpus_per_worker=1 (or backend gloo)")


def check_resources(cfg: Config, *, own_cluster: bool) -> None:
    """Fails fast on what Ray would otherwise wait for for ever.

    A cluster we started cannot grow; one we joined may (autoscaler), so there a shortfall
    is only reported.
    """
    import ray

    lc = cfg.launcher
    workers = lc.workers * lc.nodes
    need = {"CPU": workers * lc.cpus_per_worker, "GPU": workers * lc.gpus_per_worker}
    have = ray.cluster_resources()
    short = [f"{k} {v:g} (cluster has {have.get(k, 0):g})" for k, v in need.items() if v > have.get(k, 0)]
    if not short:
        return
    text = f"launcher.workers={workers} needs " + ", ".join(short)
    if own_cluster:
        raise ConfigError(text)
    print(f"ray: {text}; waiting for the autoscaler to add nodes", flush=True)


def launch(cfg: Config) -> int:
    """``launcher=ray`` entry: 0 done, 1 failed, 2 config/store error, 75 out of retries while preempted."""
    lc = cfg.launcher
    check_config(cfg)
    with ray_session(lc.address, cpus=lc.workers * lc.nodes * lc.cpus_per_worker, launcher=lc) as own:
        check_resources(cfg, own_cluster=own and not lc.address)
        print(f"ray: {lc.workers * lc.nodes} workers, run_dir {worker_cfg(cfg)['run_dir']}, "
              f"max_failures {lc.max_failures}", flush=True)
        result = fit(cfg)
    if result.exit_code:
        print(f"error: {result.message}", file=sys.stderr)
    return result.exit_code
