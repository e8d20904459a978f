"""The replica groups of ``ft.mode=replicas`` on this machine (``launcher=local``).

Starts a torchft lighthouse on loopback and ``launcher.workers`` processes per replica group
(one by default), and restarts a group that dies in place while the others go on (the local
counterpart of Ray replacing one group). A group is one unit: when any of its processes dies,
the others are killed and a whole replacement group is started. A group that left the
quorum on a notice (exit ``EXIT_LEFT``) is replaced the same way, without counting as a loss.
The replacement heals from a live peer through the quorum; the job ends when a group has
committed ``trainer.max_steps``, or fails when a group exits with a trainkit error or is lost
more than ``ft.max_restarts`` times. Once this process is
told to stop (its preemption signals, relayed to the groups, which then checkpoint and exit
75 together), nothing is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from trainkit.config import Config, run_dir_default
from trainkit.errors import EXIT_PREEMPTED
from trainkit.ft.loop import BARRIER_ENV, EXIT_LEFT, INCARNATION_ENV, LIGHTHOUSE_ENV, RANK_ENV, STORES_ENV
from trainkit.ft.records import record_attempt, write_config

# Exit codes that say the group's own job is wrong (config, store): restarting cannot help.
_FATAL = (2,)


class ReplicaSupervisor:
    def __init__(self, cfg: Config, *, poll_s: float = 0.05) -> None:
        self.cfg = cfg
        self.poll_s = poll_s
        self.restarts: dict[int, int] = {}
        self.lost: list[tuple[float, int, int]] = []  # (time, group, exit code)
        self.left: list[tuple[float, int]] = []  # (time, group): left on a notice, replaced
        self.incarnations: dict[int, int] = {}
        self.stopping = False
        self.began = time.time()

    def run(self) -> tuple[int, str]:
        """(exit code, what failed) of the job."""
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at INFO
        from torchft.coordination import LighthouseServer

        cfg, ft = self.cfg, self.cfg.ft
        if not cfg.run_dir:
            cfg.run_dir = run_dir_default(cfg.recipe)
        lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=ft.min_replicas,
                                      join_timeout_ms=int(ft.replacement_s * 1000),
                                      heartbeat_timeout_ms=int(ft.heartbeat_timeout_s * 1000))
        work = tempfile.mkdtemp(prefix="trainkit-ft-")
        config = os.path.join(work, "config.json")
        with open(config, "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f)
        env = {**os.environ, LIGHTHOUSE_ENV: f"http://127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}",
               BARRIER_ENV: os.path.join(work, "barrier"), STORES_ENV: os.path.join(work, "stores"),
               "GLOO_SOCKET_IFNAME": "lo"}
        os.makedirs(env[BARRIER_ENV])
        os.makedirs(env[STORES_ENV])
        procs: dict[tuple[int, int], subprocess.Popen[Any]] = {}
        handlers = self._note_stop_signals(procs)
        # A previous attempt whose supervisor was killed left ledgers and no logs: record it first.
        record_attempt(cfg, began=None, outcome=None)
        write_config(cfg)
        try:
            for g in range(ft.groups):
                procs.update(self._start(config, env, g, 0))
            code, message = self._watch(config, env, procs)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
            lighthouse.shutdown()
            shutil.rmtree(work, ignore_errors=True)
        outcome = {0: "finished", EXIT_PREEMPTED: "preempted"}.get(code)
        record_attempt(cfg, began=self.began, outcome=outcome)
        if code == 0:
            write_summary(cfg, began=self.began, lost=len(self.lost), left=len(self.left))
        return code, message

    def _note_stop_signals(self, procs: dict[tuple[int, int], subprocess.Popen[Any]]) -> dict[int, Any]:
        """Marks the job as stopping on a preemption signal, then runs the handler in place (the
        launcher's relay to the groups), or relays it to the groups itself; returns the
        handlers it replaced."""
        def on(signum: int, frame: Any, previous: Any) -> None:
            self.stopping = True
            if callable(previous):
                previous(signum, frame)
                return
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signum)

        replaced = {}
        for name in self.cfg.preemption.signals:
            signum = getattr(signal, name)
            replaced[signum] = previous = signal.getsignal(signum)
            signal.signal(signum, lambda s, f, previous=previous: on(s, f, previous))
        return replaced

    def _start(self, config: str, env: dict[str, str], group: int, incarnation: int
               ) -> dict[tuple[int, int], subprocess.Popen[Any]]:
        """The group's processes, keyed by (group, rank)."""
        self.incarnations[group] = incarnation
        return {(group, rank): subprocess.Popen([sys.executable, "-m", "trainkit.ft", config, str(group)],
                                                env={**env, INCARNATION_ENV: str(incarnation), RANK_ENV: str(rank)})
                for rank in range(self.cfg.launcher.workers)}

    def _watch(self, config: str, env: dict[str, str], procs: dict[tuple[int, int], subprocess.Popen[Any]]
               ) -> tuple[int, str]:
        ft = self.cfg.ft
        finished = False
        while procs:
            time.sleep(self.poll_s)
            for (g, rank), p in list(procs.items()):
                if procs.get((g, rank)) is not p:
                    continue  # its group was replaced in this pass
                code = p.poll()
                if code is None:
                    continue
                del procs[(g, rank)]
                if code == 0:
                    # Done: the final checkpoint was committed before the last quorum. Others
                    # still running are a replacement with nothing left to do, or leaving too.
                    finished = True
                    _stop(procs.values(), self.cfg.ft.timeout_s)
                    continue
                if code in _FATAL:
                    return code, f"replica group {g} failed (exit code {code})"
                if finished or self.stopping or code == EXIT_PREEMPTED:
                    continue  # the run is complete, or the groups were told to stop: no replacement
                # The group is one unit: the rest of it goes too (its ranks leave together on a
                # notice; after a loss they are stuck in the group's collectives).
                _kill_group(procs, g)
                if code == EXIT_LEFT:
                    self.left.append((time.time(), g))
                    print(f"replica group {g} left the quorum on a notice; starting its replacement", flush=True)
                    procs.update(self._start(config, env, g, self.incarnations[g] + 1))
                    continue
                self.lost.append((time.time(), g, code))
                n = self.restarts.get(g, 0) + 1
                if n > ft.max_restarts:
                    return 1, f"replica group {g} lost {n} times (exit code {code}); ft.max_restarts={ft.max_restarts}"
                self.restarts[g] = n
                print(f"replica group {g} lost (exit code {code}); starting its replacement", flush=True)
                procs.update(self._start(config, env, g, self.incarnations[g] + 1))
        if not finished:
            return EXIT_PREEMPTED, ""  # every group was stopped: relaunch to resume
        return 0, ""


def accounting(cfg: Config) -> dict[str, Any]:
    """Goodput, badput and, with a price, cost, from the logs :func:`record_attempt` wrote
    (summary.json's keys, as the restart mode writes them)."""
    from trainkit import rundir
    from trainkit.cost import bill, goodput

    g = goodput(rundir.read_metrics(cfg.run_dir), rundir.read_events(cfg.run_dir))
    out: dict[str, Any] = {key: g[key] for key in ("goodput", "steady_goodput", "useful_s")}
    out.update(run_wall_s=g["wall_s"], attempts=g["attempts"], badput_s=g["badput_s"])
    price = cfg.cost.price()
    if price is not None:
        cost = bill(g, price)
        out.update(cost_usd=cost["usd"], cost=cost)
    return out


def write_summary(cfg: Config, *, began: float, lost: int, left: int) -> None:
    """``summary.json`` from the groups' ledgers, after checking from them that every step
    trained its positions exactly once (a violation fails the job with its step)."""
    from trainkit import rundir, storage
    from trainkit.ft.ledger import account

    ft = cfg.ft
    acc = account(cfg.run_dir, groups=ft.groups, steps=cfg.trainer.max_steps, batch=cfg.data.batch_size,
                  workers=cfg.launcher.workers)
    heals = [h["source"] for hs in acc.healed.values() for h in hs]
    summary = {
        "run_dir": cfg.run_dir, "strategy": cfg.strategy.name, "world_size": ft.groups * cfg.launcher.workers,
        "steps": cfg.trainer.max_steps, "wall_s": time.time() - began,
        "loss": acc.losses[-1] if acc.losses else None, **accounting(cfg),
        "ft": {"mode": ft.mode, "groups": ft.groups, "workers_per_group": cfg.launcher.workers,
               "groups_lost": lost, "groups_left": left,
               "healed_from_peer": heals.count("peer"), "restored_from_checkpoint": heals.count("checkpoint"),
               "steps_with_fewer_groups": sum(1 for n in acc.participants if n < ft.groups),
               "steps_redone": acc.redone, "steps_recomputed": len(acc.recomputed), "exactly_once": True},
    }
    url = rundir.path(cfg.run_dir, rundir.SUMMARY)
    fs, path = storage.filesystem(url)
    if storage.is_local(url):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    storage.retry(lambda: fs.pipe(path, json.dumps(summary, indent=2).encode()), what=url)
    print(f"replicas: {cfg.trainer.max_steps} steps, every position trained once; {lost} group(s) "
          f"lost, {left} left on a notice, {heals.count('peer')} healed from a peer, {heals.count('checkpoint')} "
          "from a checkpoint", flush=True)


def _kill_group(procs: dict[tuple[int, int], subprocess.Popen[Any]], group: int) -> None:
    """SIGKILLs the group's other processes (a replacement group starts from scratch)."""
    for key in [k for k in procs if k[0] == group]:
        p = procs.pop(key)
        if p.poll() is None:
            p.kill()
        p.wait()


def _stop(procs: Any, grace_s: float) -> None:
    """SIGTERM (a group leaves through its ``finally``), SIGKILL after ``grace_s``."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
