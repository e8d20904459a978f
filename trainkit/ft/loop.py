"""One replica group's training loop under ``ft.mode=replicas`` (one process per group, or
``launcher.workers`` processes per group).

Every step: a quorum (torchft ``Manager.start_quorum``, synchronous, so a replacement heals
before it computes), this group's chunks of the step's global batch, a checked all-reduce of
the gradients and the loss, ``should_commit``, and only then the optimizer step. The step
number is the Manager's (committed steps), and the data positions are a function of it:
step ``s`` trains positions ``[s * B, (s + 1) * B)`` of trainkit's order, cut into
``ft.groups`` chunks of ``B / ft.groups``; participant ``r`` of ``n`` takes chunks
``r, r + n, ...``. A step that does not commit is redone with the same positions, so each
position is trained exactly once, whoever joins or leaves. Each chunk's gradient is computed
alone and scaled by ``1 / ft.groups``, so the sum over chunks does not depend on who computed
which (with two groups it is the same float sum in any membership).

With ``W = launcher.workers`` processes per group (``strategy=fsdp``, HSDP-style), the group's
processes shard the model with FSDP2 over their own process group (``strategy=ddp``: each
holds all of it, :func:`_group_mesh`), and each chunk is cut in
``W`` equal slices, rank ``i`` training slice ``i`` (:func:`shard`); FSDP reduce-scatters each
chunk's gradient inside the group (a mean over the slices: the chunk's gradient), and rank
``i`` of each group all-reduces its gradient shard with rank ``i`` of the others (torchft's
Manager configures one cross-group process group per rank). torchft's Manager runs per rank
(``rank``/``world_size`` = the group's), so the group's quorum, commit vote and heal are one:
rank ``i`` heals its shard from rank ``i`` of a live group.

Start-up is ordered (model, data, checkpointer, then the Manager last, then a barrier among the
first incarnations so the first quorum has every group) and the Manager is shut down on every
exit path, so a dying group stops heartbeating at once. A preemption notice makes the group
leave the quorum without costing its peers a step or a heartbeat timeout (:class:`_Leave`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from trainkit import _compat, distributed, rundir, storage
from trainkit.config import Config, load_config
from trainkit.data import default_collate
from trainkit.errors import Preempted, TrainkitError
from trainkit.optim import optimizer_factory, scheduler
from trainkit.tasks import TASKS
from trainkit.tasks.base import default_url

# Set by the supervisor for each group process.
LIGHTHOUSE_ENV = "TRAINKIT_FT_LIGHTHOUSE"
INCARNATION_ENV = "TRAINKIT_FT_INCARNATION"
BARRIER_ENV = "TRAINKIT_FT_BARRIER"
# The process's rank in its group (several processes per group; 0 when unset).
RANK_ENV = "TRAINKIT_FT_RANK"
# A folder where rank 0 of each group incarnation publishes its store's port (several processes per group).
STORES_ENV = "TRAINKIT_FT_STORES"
# Chaos: ``group:step:point[,...]`` makes a group's first incarnation SIGKILL itself at a step
# (every process of it; ``group.rank:step:point``: that rank's process only),
# ``point`` = ``allreduce`` (while its peers wait in the all-reduce) or ``commit`` (after the
# step committed, between steps), or send itself SIGTERM at the step's start (``notice``: a spot
# notice through the preemption watcher). What trainkit.chaos and the tests use for repeatable
# failures.
KILL_ENV = "TRAINKIT_FT_KILL"
# A group that left the quorum on a notice while other groups went on: the supervisor starts
# its replacement (75 is kept for "every group stopped: relaunch to resume").
EXIT_LEFT = 76
# The tail of a group's all-reduce buffer after the flat gradients: the share's loss, its
# validity vote, "this group is leaving", "this leaver's heartbeat has expired".
_LOSS, _VOTE, _LEAVING, _STALE = -4, -3, -2, -1
# A peer that dies while its group's share is in flight: its peers are inside the all-reduce.
_KILL_DELAY_S = 0.5


def chunks(step: int, batch: int, groups: int, rank: int, participants: int) -> list[tuple[int, int]]:
    """The global positions participant ``rank`` of ``participants`` trains at ``step``."""
    if not 0 <= rank < participants <= groups:
        raise TrainkitError(f"replica rank {rank} of {participants} participants with ft.groups={groups}")
    size, start = batch // groups, step * batch
    return [(start + c * size, start + (c + 1) * size) for c in range(rank, groups, participants)]


def shard(part: tuple[int, int], workers: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s slice of one chunk when a group has ``workers`` processes."""
    lo, hi = part
    size = (hi - lo) // workers
    return lo + rank * size, lo + (rank + 1) * size


@dataclass
class _Kill:
    step: int
    point: str


def _kills(group: int, rank: int = 0) -> list[_Kill]:
    if os.environ.get(INCARNATION_ENV, "0") != "0":
        return []
    out = []
    for item in filter(None, os.environ.get(KILL_ENV, "").split(",")):
        who, step, point = item.split(":")
        g, _, r = who.partition(".")
        if int(g) == group and (not r or int(r) == rank):
            out.append(_Kill(int(step), point))
    return out


def _die_if(kills: list[_Kill], step: int, point: str, ledger: Any = None) -> None:
    if any(k.step == step and k.point == point for k in kills):
        if point == "notice":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if point == "allreduce":
            time.sleep(_KILL_DELAY_S)
        if ledger is not None:  # when the kill happened: the time to the survivors' next commit
            ledger.write({"event": "killed", "step": step, "point": point, "time": time.time()})
        os.kill(os.getpid(), signal.SIGKILL)


class LeftQuorum(Exception):
    """This group left the quorum after a notice and its peers go on (exit code EXIT_LEFT)."""


def _local(t: Any) -> Any:
    """A sharded (DTensor) tensor's own shard; any other value as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _local_tree(value: Any) -> Any:
    """A state tree with each DTensor replaced by its shard: what the peer transfer carries
    (plain tensors, which ``torch.load(weights_only=True)`` accepts)."""
    if isinstance(value, dict):
        return {k: _local_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local_tree(v) for v in value)
    return _local(value)


class _Replica:
    """The model, optimizer, schedule and data of one group's process (rank ``rank`` of
    ``workers``; with ``mesh``, the group's mesh, the model is wrapped by FSDP2 over it), and
    one step's arithmetic."""

    def __init__(self, cfg: Config, *, rank: int = 0, workers: int = 1, mesh: Any = None) -> None:
        self.cfg = cfg
        task = TASKS.get(cfg.task, "task")
        self.task = task
        model_cfg = task.model_config(**cfg.model)
        torch.manual_seed(cfg.seed)  # identical initial weights in every group, no broadcast
        self.model = task.build_model(model_cfg)
        self.model.train()
        self.rank, self.workers, self.sharded = rank, workers, mesh is not None
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            from trainkit.strategies.base import default_units

            reshard = bool(getattr(cfg.strategy, "reshard_after_forward", True))
            for unit in default_units(self.model):
                fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(self.model, mesh=mesh, reshard_after_forward=False)  # as strategies/fsdp.py
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(cfg.optim)(self.params)
        self.scheduler = scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        from trainkit.data import Stream

        d = cfg.data
        self.stream = Stream(cfg.data.url or default_url(task, cfg.model), cache_dir=d.cache_dir or None,
                             cache_bytes=d.cache_bytes, shuffle=d.shuffle, shuffle_window=d.shuffle_window,
                             prefetch=None if d.prefetch < 0 else d.prefetch,
                             format=None if d.format == "auto" else d.format)
        self.batch = d.batch_size
        self.data_s = 0.0  # the last share's time reading its samples
        self.groups = cfg.ft.groups

    def slices(self, parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """What this process trains of the group's chunks: its slice of each."""
        return [shard(p, self.workers, self.rank) for p in parts]

    def gradients(self, parts: list[tuple[int, int]]) -> torch.Tensor:
        """This process's share of the step: flat gradients (its shard of them when sharded:
        FSDP has reduced each chunk's over the group) and loss, each chunk weighted 1/groups."""
        self.optimizer.zero_grad(set_to_none=True)
        weight = 1.0 / self.groups
        loss_sum = torch.zeros((), dtype=torch.float32)
        self.data_s = 0.0
        for lo, hi in self.slices(parts):
            t0 = time.perf_counter()
            ids = self.stream.ids_at(self.cfg.seed, lo, hi)
            batch = default_collate([self.stream[int(i)] for i in ids])
            self.data_s += time.perf_counter() - t0
            loss, _ = self.task.loss(self.model, batch)
            (loss * weight).backward()
            # Each slice's mean loss counts 1/workers of its chunk's (the group sums them).
            loss_sum = loss_sum + loss.detach().float() * weight / self.workers
        flat = [_local(p.grad).reshape(-1) if p.grad is not None
                else torch.zeros(_local(p).numel(), dtype=p.dtype) for p in self.params]
        # The loss, this group's vote that its share is valid (see checked_allreduce), and the
        # leave flags (see run_group), set by the caller.
        tail = torch.tensor([float(loss_sum), 1.0, 0.0, 0.0], dtype=flat[0].dtype)
        return torch.cat([*flat, tail])

    def apply(self, buf: torch.Tensor) -> float:
        """Steps the optimizer on the reduced gradients; returns the step's global-batch loss."""
        offset = 0
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = _local(p.grad)
            n = grad.numel()
            grad.copy_(buf[offset:offset + n].view_as(grad))
            offset += n
        clip = self.cfg.trainer.grad_clip
        if clip:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(buf[_LOSS])

    def state_dict(self, step: int) -> dict[str, Any]:
        """This process's state (its shards when sharded), as its peer rank in a replacement loads it."""
        return {"model": _local_tree(self.model.state_dict()), "optimizer": _local_tree(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(), "data": {"position": step * self.batch}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.sharded:
            self._load_shards(state)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.healed_position = int(state["data"]["position"])

    def _load_shards(self, state: Mapping[str, Any]) -> None:
        """Copies a peer rank's shards into this process's (the same mesh and layout), and
        rebuilds its optimizer state as DTensors laid out like their parameters."""
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            for name, own in self.model.state_dict(keep_vars=True).items():
                _local(own).copy_(state["model"][name])
        osd = state["optimizer"]
        params = {i: p for saved, group in zip(osd["param_groups"], self.optimizer.param_groups)
                  for i, p in zip(saved["params"], group["params"])}
        for i, entry in osd["state"].items():
            p = params[i]
            for key, value in entry.items():
                if isinstance(p, DTensor) and torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                                                    shape=p.shape, stride=p.stride())
        self.optimizer.load_state_dict(osd)


def reference_losses(cfg_dict: Mapping[str, Any]) -> list[float]:
    """The losses of the same steps trained by one group alone in this process, with no
    torchft: what any membership history must reproduce (within the stated bound)."""
    cfg = load_config(cfg_dict)
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(cfg))
    try:
        replica = _Replica(cfg)
        losses = []
        for step in range(cfg.trainer.max_steps):
            buf = replica.gradients(chunks(step, cfg.data.batch_size, cfg.ft.groups, 0, 1))
            losses.append(replica.apply(buf))
        return losses
    finally:
        torch.set_num_threads(threads)


def _threads(cfg: Config) -> int:
    """Intra-op threads per group, fixed by the config: kernels then sum in the same order
    whichever group computes a chunk."""
    return cfg.trainer.threads or max(1, (os.cpu_count() or 1) // (cfg.ft.groups * cfg.launcher.workers))


class _Checkpoints:
    """The durable state, through trainkit's checkpointer (for when no group is left)."""

    def __init__(self, cfg: Config, replica: _Replica) -> None:
        from trainkit.checkpoint import Checkpointer, ModelOptimState

        c = cfg.checkpoint
        self.every = c.every_steps if c.enabled else 0
        self.enabled = c.enabled
        self.position = _Position(cfg.data.batch_size)
        self.state: dict[str, Any] = {"model_optim": ModelOptimState(replica.model, replica.optimizer),
                                      "scheduler": replica.scheduler, "data": self.position}
        self.checkpointer = Checkpointer(storage.join(cfg.run_dir, rundir.CHECKPOINTS), keep_last=c.keep_last,
                                         keep_every=c.keep_every, async_save=False) if c.enabled else None

    def latest(self) -> int | None:
        return self.checkpointer.latest_step() if self.checkpointer is not None else None

    def load(self) -> int | None:
        assert self.checkpointer is not None
        step = self.checkpointer.load(self.state)
        return None if step is None else self.position.position // self.position.batch

    def save(self, step: int) -> None:
        if self.checkpointer is not None:
            self.position.position = step * self.position.batch
            self.checkpointer.save(step, self.state, blocking=True)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()


class _Position:
    """The data position in the state tree: global samples trained, ``step * batch``."""

    def __init__(self, batch: int) -> None:
        self.batch, self.position = batch, 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "batch_size": self.batch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["batch_size"]) != self.batch:
            raise TrainkitError(f"the checkpoint was trained with data.batch_size={state['batch_size']}, "
                                f"this run has {self.batch}: ft.mode=replicas keeps the global batch")
        self.position = int(state["position"])


def _barrier(path: str, group: int, rank: int, processes: int, timeout: float) -> None:
    """Waits until every first-incarnation process has built its Manager (they all heartbeat)."""
    Path(path, f"ready-{group}-{rank}").touch()
    deadline = time.monotonic() + timeout
    while sum(1 for _ in Path(path).glob("ready-*")) < processes:
        if time.monotonic() > deadline:
            raise TrainkitError(f"replica groups did not all start within ft.replacement_s={timeout}")
        time.sleep(0.02)


class _Leave:
    """This group's notice-backed leave, and the window in which its peers wait for it.

    torchft's lighthouse has no leave call: a group is dropped once its heartbeat is
    ``ft.heartbeat_timeout_s`` old, and until then a quorum without it does not form (with two
    groups the split-brain rule holds it; with more, the wait for stragglers). So a group with
    a notice shuts its Manager down at once (the heartbeat stops) but keeps training its share
    under the membership it had, with no quorum, for as long as the lighthouse still counts it;
    its peers do the same (the "window"). Its flags in the all-reduce tell every group who is
    leaving and when each leaver's heartbeat has expired; after that step the leavers go and
    the others' next quorum forms at once without them. No step is lost and nobody waits.
    """

    def __init__(self, stale_after: float, agree: Callable[[float], float] | None = None) -> None:
        self.stale_after = stale_after  # ft.leave_after_s
        # With several processes per group: makes them agree on the flag (each silenced its
        # Manager at its own instant), so every rank's all-reduce carries the same flags.
        self.agree = agree
        self.silent_since: float | None = None  # when this group's Manager was shut down
        self.reason = ""

    @property
    def leaving(self) -> bool:
        return self.silent_since is not None

    def silent_s(self) -> float:
        return 0.0 if self.silent_since is None else time.monotonic() - self.silent_since

    def flags(self, buf: torch.Tensor) -> None:
        if self.leaving:
            buf[_LEAVING] = 1.0
            stale = float(self.silent_s() >= self.stale_after)
            buf[_STALE] = stale if self.agree is None else self.agree(stale)


def _group_store(cfg: Config, group: int, rank: int) -> Any:
    """The store of this group incarnation's processes (their process group, their Managers):
    rank 0 hosts it on loopback and publishes its port in the supervisor's folder."""
    from torch.distributed import TCPStore

    path = Path(os.environ[STORES_ENV], f"{group}-{os.environ.get(INCARNATION_ENV, '0')}")
    if rank == 0:
        store = distributed.loopback_store()
        path.with_suffix(".tmp").write_text(str(store.port))
        path.with_suffix(".tmp").rename(path)
        return store
    deadline = time.monotonic() + cfg.ft.replacement_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TrainkitError(f"rank 0 of replica group {group} published no store within "
                                f"ft.replacement_s={cfg.ft.replacement_s}")
        time.sleep(0.02)
    return TCPStore("127.0.0.1", int(path.read_text()), is_master=False, wait_for_workers=False,
                    timeout=timedelta(seconds=cfg.ft.timeout_s))


def _group_mesh(cfg: Config, store: Any, rank: int) -> Any:
    """The group's own process group (the default one in this process) and its FSDP2 mesh:
    the model sharded over the group's processes (``strategy=fsdp``), or with ``strategy=ddp``
    whole on each of them (FSDP2's HSDP layout with shards of one process: each chunk's
    gradient is all-reduced inside the group instead of reduce-scattered)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    workers = cfg.launcher.workers
    dist.init_process_group("gloo", store=dist.PrefixStore("trainkit/group", store), rank=rank,
                            world_size=workers, timeout=timedelta(seconds=cfg.ft.timeout_s))
    if cfg.strategy.name == "fsdp":
        return init_device_mesh("cpu", (workers,))
    return init_device_mesh("cpu", (workers, 1), mesh_dim_names=("replicate", "shard"))


def _group_sum(value: float) -> float:
    """Sums one number over the group's processes (its own process group)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def run_group(cfg_dict: Mapping[str, Any], group: int, *, rank: int | None = None,
              say: Callable[[str], None] = print) -> int:
    """Trains as process ``rank`` (default: ``RANK_ENV``'s, else 0) of replica group ``group``
    until ``trainer.max_steps`` is committed; returns it.

    A preemption notice (``preemption.*``: signals, cloud pollers) makes the group leave the
    quorum when others remain (:class:`_Leave`; raises :class:`LeftQuorum`), or, when every
    group of the membership has one, end with the usual emergency checkpoint (``Preempted``).
    """
    from trainkit.preemption import PreemptionWatcher

    cfg = load_config(cfg_dict)
    ft = cfg.ft
    storage.configure(cfg.storage)
    torch.set_num_threads(_threads(cfg))
    rank = int(os.environ.get(RANK_ENV, "0")) if rank is None else rank
    kills = _kills(group, rank)
    workers = cfg.launcher.workers
    sharded = cfg.strategy.name == "fsdp" or workers > 1  # the group has its own process group and mesh
    incarnation = int(os.environ.get(INCARNATION_ENV, "0"))
    store = _group_store(cfg, group, rank) if sharded else None
    replica = _Replica(cfg, rank=rank, workers=workers, mesh=_group_mesh(cfg, store, rank) if sharded else None)
    durable = _Checkpoints(cfg, replica)
    from trainkit.metrics import JsonlLog

    ledger = JsonlLog(cfg.run_dir, rundir.ft_ledger(group, rank), flush_seconds=0.0)
    manager = None
    ledger.write({"event": "start", "group": group, "incarnation": incarnation, "pid": os.getpid(),
                  "time": time.time(), **({"group_rank": rank} if sharded else {})})
    p = cfg.preemption
    watcher = PreemptionWatcher(signals=p.signals, aws_endpoint=p.aws_endpoint, gcp_endpoint=p.gcp_endpoint,
                                poll_seconds=p.poll_seconds,
                                on_stop=f"leave the quorum and exit {EXIT_LEFT}, or, if every group got it, "
                                        "checkpoint and exit 75").start()
    leave = _Leave(ft.leave_after_s, None if workers == 1 else lambda stale: float(_group_sum(stale) >= workers))
    try:
        manager, pg, store = _manager(cfg, group, replica, store)  # the store must outlive the loop
        barrier = os.environ.get(BARRIER_ENV)
        if barrier and incarnation == 0:
            _barrier(barrier, group, rank, ft.groups * workers, ft.replacement_s)
        expected: int | None = None  # the step this group is at before a quorum; None: no state yet
        window: tuple[int, int] | None = None  # (rank, participants) kept while a leaver's heartbeat expires
        while True:
            t0 = time.time()
            if window is None:
                manager.start_quorum()
                if expected is None:
                    # Only a quorum that completed says whether anybody is ahead (a failed heal is
                    # retried at the next one, never replaced by the checkpoint).
                    if manager.errored() is None:
                        _restore_if_alone(manager, replica, durable, group, ledger, say)
                elif manager.current_step() != expected:
                    _healed(manager, replica, group, ledger, say)
                step = manager.current_step()
                n, r = manager.num_participants(), manager.participating_rank()
                quorum_s = time.time() - t0
            else:
                quorum_s = 0.0
                assert expected is not None
                step, (r, n) = expected, window
            if step >= cfg.trainer.max_steps:
                break
            if r is None:
                raise TrainkitError(f"replica group {group} is not in the quorum of step {step}")
            _die_if(kills, step, "notice")
            # The group leaves as one: any process's notice is every process's.
            requested = watcher.requested if workers == 1 else _group_sum(float(watcher.requested)) > 0
            if requested and not leave.leaving:
                # Silent from now on; the share of this step and of the window still counts.
                manager.shutdown(wait=False)
                leave.silent_since, leave.reason = time.monotonic(), watcher.reason or "a notice to the group"
                ledger.write({"event": "leaving", "group": group, "step": step, "reason": leave.reason,
                              "time": time.time()})
            parts = chunks(step, cfg.data.batch_size, ft.groups, r, n)
            buf = replica.gradients(parts)
            _die_if(kills, step, "allreduce", ledger)
            reduced = checked_allreduce(manager, pg, buf, leave)
            if sharded:
                # Rank i's sum holds its slices of every chunk: the step's loss is the group's sum.
                buf[_LOSS] = _group_sum(float(buf[_LOSS]))
            # A leaver's Manager is shut down: the vote is its commit (its peers' should_commit
            # says the same for them: both are "the all-reduce completed with every share").
            # Every process of a group votes (should_commit is the group's collective), even one
            # whose all-reduce failed: the vote is then no for the whole group.
            if leave.leaving:
                committed = reduced
            else:
                committed = (manager.should_commit() if reduced or sharded else False) and reduced
            leavers, expired = int(buf[_LEAVING]), int(buf[_STALE])
            if not committed:
                if leave.leaving:
                    raise LeftQuorum(f"replica group {group} left the quorum at step {step} after a notice "
                                     f"({leave.reason}); the step was not committed, its peers redo it")
                window = None  # whoever was leaving left with it: the next quorum settles it
                if expected is not None or step > 0:
                    expected = step
                ledger.write({"step": step, "group": group, "redo": True, "participants": n,
                              "time": time.time(), "error": str(manager.errored() or "")[:200]})
                continue
            loss = replica.apply(buf)
            ledger.write({"step": step, "group": group, "rank": r, "participants": n, "chunks": parts,
                          "loss": loss, "lr": replica.scheduler.get_last_lr()[0], "time": time.time(),
                          "step_s": time.time() - t0, "quorum_s": quorum_s, "data_s": replica.data_s,
                          **({"window": True} if window is not None else {}),
                          **({"group_rank": rank, "slices": replica.slices(parts), "incarnation": incarnation}
                             if sharded else {})})
            last = step + 1 == cfg.trainer.max_steps
            everyone_leaves = leavers == n
            periodic = durable.every and (step + 1) % durable.every == 0
            if r == 0 and durable.enabled and (last or everyone_leaves or periodic):
                # The last one before the final quorum, which waits for it: once any group
                # has left with the run done, the final checkpoint is committed. With every
                # group leaving, the emergency save.
                t_save = time.perf_counter()
                durable.save(step + 1)
                ledger.write({"event": "checkpoint", "group": group, "step": step + 1,
                              "blocking_s": time.perf_counter() - t_save, "time": time.time()})
            expected = step + 1
            _die_if(kills, step, "commit", ledger)
            if everyone_leaves:
                ledger.write({"event": "preempted", "group": group, "step": step + 1, "time": time.time()})
                raise Preempted(f"replica group {group}: every group had a notice; checkpoint at step {step + 1}, "
                                "relaunch to resume")
            if leavers and expired == leavers:
                window = None
                if leave.leaving:
                    ledger.write({"event": "left", "group": group, "step": step + 1, "silent_s": leave.silent_s(),
                                  "time": time.time()})
                    raise LeftQuorum(f"replica group {group} left the quorum at step {step + 1} after a notice "
                                     f"({leave.reason}); its peers go on")
            elif leavers:
                window = (r, n)
        if sharded:
            # Rank 0 hosts the group's ManagerServer: it waits until every rank has the last
            # quorum's answer, or one still waiting for it would fail on a closed connection.
            _group_sum(0.0)
        return step
    finally:
        watcher.stop()
        if manager is not None and not leave.leaving:
            manager.shutdown(wait=False)
        durable.close()
        ledger.close()


def checked_allreduce(manager: Any, pg: Any, buf: torch.Tensor, leave: _Leave | None = None) -> bool:
    """Sums ``buf`` over the quorum's groups; False (and the step is not committed) when a peer
    was lost on the way or had no valid share.

    torchft's DDP comm hook fails ``assert fut._fut`` and kills the survivor when a peer dies
    mid-all-reduce (torchft 0.2); here the collective runs on the Manager's process group
    directly and any failure is only reported to the Manager, so ``should_commit`` says no.
    The vote element is each group's "my share is valid". A group that failed before the
    collective (a heal that did not complete) still takes part, with zeros and a 0 vote, so
    its peers learn it at once instead of after the collective's timeout; every group then
    sees a sum below the participants and redoes the step. ``leave`` adds this group's leave
    flags (a shut-down Manager still answers these calls: they read its last quorum).
    """
    from torch.distributed import AllreduceOptions, ReduceOp

    valid = manager.errored() is None
    if not valid:
        buf.zero_()
    if leave is not None:
        leave.flags(buf)
    try:
        manager.wait_quorum()
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.SUM
        pg.allreduce([buf], opts).wait()
    except Exception as exc:  # a lost peer surfaces as whatever gloo raises: all mean "redo"
        manager.report_error(exc)
        return False
    votes, participants = int(buf[_VOTE].item()), manager.num_participants()
    if valid and votes != participants:
        manager.report_error(TrainkitError(f"{participants - votes} of {participants} groups had no valid share"))
    return manager.errored() is None


def _manager(cfg: Config, group: int, replica: _Replica, store: Any = None) -> tuple[Any, Any, Any]:
    """The torchft Manager for this process of the group, its cross-group process group and
    the group's store (``store``: the group's, else one of its own); built last, since the
    Manager heartbeats from here on."""
    from torchft import Manager, ProcessGroupGloo

    from trainkit.ft.transport import LoopbackTransport

    ft = cfg.ft
    timeout = timedelta(seconds=ft.timeout_s)
    store = store if store is not None else distributed.loopback_store()
    pg = ProcessGroupGloo(timeout=timeout)
    def state() -> dict[str, Any]:
        return replica.state_dict(manager.current_step())

    with _compat.torchft_manager_bound_to("127.0.0.1"):
        manager = Manager(
            pg=pg, load_state_dict=replica.load_state_dict, state_dict=state, min_replica_size=ft.min_replicas,
            use_async_quorum=False, timeout=timeout, quorum_timeout=timedelta(seconds=ft.quorum_timeout_s),
            connect_timeout=timeout, rank=replica.rank, world_size=replica.workers, store_addr="127.0.0.1",
            store_port=store.port,
            lighthouse_addr=os.environ[LIGHTHOUSE_ENV], replica_id=f"trainkit_group_{group}",
            hostname="127.0.0.1", checkpoint_transport=LoopbackTransport("127.0.0.1", timeout),
            init_sync=False,
        )
    return manager, pg, store


def _healed(manager: Any, replica: _Replica, group: int, ledger: Any, say: Callable[[str], None]) -> None:
    step = manager.current_step()
    healed = getattr(replica, "healed_position", None)
    if healed != step * replica.batch:
        raise TrainkitError(f"replica group {group} healed to step {step} with data position {healed}")
    ledger.write({"event": "healed", "group": group, "step": step, "source": "peer", "time": time.time()})
    say(f"replica group {group}: healed from a live peer at step {step}")


def _restore_if_alone(manager: Any, replica: _Replica, durable: _Checkpoints, group: int, ledger: Any,
                      say: Callable[[str], None]) -> None:
    """After the first quorum: healed from a live peer, or, with nobody ahead of us, the latest
    committed checkpoint (never step 0 while one exists)."""
    if manager.current_step() > 0:
        _healed(manager, replica, group, ledger, say)
        return
    if durable.latest() is None:
        return
    t0 = time.perf_counter()
    loaded = durable.load()
    if loaded is None:
        return
    manager.load_state_dict({"step": loaded, "batches_committed": loaded * replica.groups})
    ledger.write({"event": "healed", "group": group, "step": loaded, "source": "checkpoint",
                  "load_s": time.perf_counter() - t0, "time": time.time()})
    say(f"replica group {group}: no live peer; restored the committed checkpoint at step {loaded}")
