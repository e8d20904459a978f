"""The driver's connection to Ray: a private one on loopback, or a cluster it joins."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from trainkit.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost")
# GCS settings for a cluster whose nodes vanish (spot): a node that stops answering is
# declared dead after ~3 failed 1 s checks instead of Ray's 5 x 3 s (up to 5 x 10 s for a
# VM that no longer answers at all). Until then Ray Train's restart waits on the dead
# workers' RPCs and object pulls may wait on the dead node. Pass it to the head's
# ``ray start --system-config`` (launchers/*-spot.yaml do); the spot bench's cluster uses it.
SPOT_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                      "health_check_failure_threshold": 3}


def ray_env() -> None:
    """Process-wide settings for our driver, before Ray is imported."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray would chdir workers into its own trial directory; paths are absolute anyway.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Identical lines from several workers stay separate lines, in order.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Rank 0's progress lines stay plain stdout lines instead of Ray Train's log records.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's drain watcher feeds ray.train.get_preemption_info(); poll a little faster
    # than its 5 s default.
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
    from trainkit import _compat

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    _compat.ray_keep_loopback()  # when Ray was imported already: the flag is read per call


def warm_standby_on(lc: Any) -> bool:
    """Opt-in (experimental, on Ray internals: see warm_pool), and only on a cluster we join: a
    private local Ray has no spare node to restart on and no spare cores to import on. Over
    Ray Client the driver cannot reach the raylets."""
    return bool(lc.warm_standby > 0 and lc.address and not lc.address.startswith("ray://"))


@contextlib.contextmanager
def ray_session(address: str, *, cpus: float = 0.0, launcher: Any = None) -> Iterator[bool]:
    """Connects this process to Ray; yields True when we started (and will stop) it.

    ``address=""`` starts a private single-node Ray pinned to 127.0.0.1 with at least
    ``cpus`` logical CPUs (so ``workers=4`` works on a 2-core laptop as it does locally).
    An already-initialised Ray (a test, a notebook) is used as it is. With a
    ``launcher`` config whose ``warm_standby`` is on, the session keeps warm standby worker
    processes (:mod:`trainkit.launch.ray.warm_pool`) for as long as it lasts.
    """
    ray_env()
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
        from trainkit.launch.ray.warm_pool import WarmPool

        pool = WarmPool(workers=launcher.world_size, cpus_per_worker=launcher.cpus_per_worker,
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


def check_resources(lc: Any, *, own_cluster: bool) -> None:
    """Fails fast on what Ray would otherwise wait for for ever.

    A cluster we started cannot grow; one we joined may (autoscaler), so there a shortfall
    is only reported.
    """
    import ray

    workers = lc.world_size
    need = {"CPU": workers * lc.cpus_per_worker, "GPU": workers * lc.gpus_per_worker}
    have = ray.cluster_resources()
    short = [f"{k} {v:g} (cluster has {have.get(k, 0):g})" for k, v in need.items() if v > have.get(k, 0)]
    if not short:
        return
    text = f"launcher.workers={workers} needs " + ", ".join(short)
    if own_cluster:
        raise ConfigError(text)
    print(f"ray: {text}; waiting for the autoscaler to add nodes", flush=True)


def driver_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return ""
