"""``Run``: the one object a training loop needs, whoever launched it.

It joins the process group, seeds, wraps model and optimizer per ``cfg.strategy``, builds
the data loader, restores the latest committed checkpoint, and at every step boundary does
the run's bookkeeping: metrics, checkpoint policy and the preemption agreement. The loop
itself stays the user's::

    run = trainkit.Run(cfg)
    model, opt = run.setup(model, run.optimizer())
    data = run.loader(trainkit.data.Stream(url))
    run.restore(model=model, optimizer=opt, data=data)
    for batch in run.steps(data):
        with run.autocast():
            loss = loss_fn(model, batch)
        run.backward(loss)
        run.optimizer_step(opt)
    run.finish()
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from trainkit import distributed, rundir, storage
from trainkit.checkpoint.protocol import CheckpointerProtocol
from trainkit.config import Config, check_batch, launch_environment, load_config, run_dir_default
from trainkit.errors import ConfigError, Preempted
from trainkit.metrics import JsonlLog, Progress, format_summary
from trainkit.metrics.window import LogWindow
from trainkit.optim import optimizer_factory, scheduler
from trainkit.preemption.grace import GraceCheck
from trainkit.redact import redact
from trainkit.strategies import STRATEGIES
from trainkit.strategies.base import OptimizerArg, StepSettings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Run:
    def __init__(self, cfg: Config | Mapping[str, Any] | None = None) -> None:
        # The attempt's start-up (process group, model, data, restore) is timed from here.
        self._start = time.time()
        if cfg is None:
            cfg = Config()
        # Validated again even when built in code: names resolve to their components' options
        # (``strategy.name = "fsdp"`` on a fresh Config), and ``auto`` to this world size.
        self.cfg = load_config(launch_environment(cfg.to_dict() if isinstance(cfg, Config) else cfg))
        cfg = self.cfg
        if not cfg.run_dir:
            cfg.run_dir = run_dir_default(cfg.recipe)
        storage.configure(cfg.storage)
        self.dist = distributed.init(cfg.strategy.backend, threads=cfg.trainer.threads)
        if cfg.strategy.name != "single" and not self.dist.distributed:
            # One process without a launcher: torch's wrappers still need a (1-rank) group.
            self.dist = _single_process_group(cfg)
        self.micro_batch = check_batch(cfg, self.dist.world_size)
        # Same seed on every rank: identical initial weights without a broadcast.
        seed_everything(cfg.seed)
        self.strategy = STRATEGIES.get(cfg.strategy.name, "strategy")(cfg.strategy, self.dist, StepSettings.of(cfg))
        self.run_dir = cfg.run_dir
        self.step = 0
        self.micro = 0
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.model: nn.Module | None = None
        self.restored_step: int | None = None
        self._noted_commits = 0
        self._state: dict[str, Any] | None = None
        self._window = LogWindow(self.dist.device)
        self._stepped = False
        # The last step's pre-clip norm, a device tensor until a logging step reads it.
        self._grad_norm: Any = None
        self._last_record: dict[str, Any] = {}
        main = self.dist.is_main
        self.metrics = JsonlLog(self.run_dir, rundir.METRICS) if main else None
        self.events = JsonlLog(self.run_dir, rundir.EVENTS) if main else None
        # Made by restore(), once the state tree is known: no tree, nothing to save.
        self.checkpointer: CheckpointerProtocol | None = None
        self.save_policy: Any = None
        from trainkit.preemption import PreemptionWatcher, StepAgreement

        self._grace = GraceCheck(cfg.preemption.grace_seconds, self._event, self._print)

        p = cfg.preemption
        self.watcher = PreemptionWatcher(
            signals=p.signals, aws_endpoint=p.aws_endpoint, gcp_endpoint=p.gcp_endpoint,
            poll_seconds=p.poll_seconds,
        )
        self.watcher.start()
        self.agreement = StepAgreement(self.watcher, every_s=p.agree_every_s)
        self.loggers: list[Any] = []
        if main and cfg.trainer.loggers:
            from trainkit.metrics.loggers import build_loggers

            self.loggers = build_loggers(cfg.trainer.loggers, self.run_dir, cfg.trainer.logger_options,
                                         config=redact(cfg.to_dict()))
        self.attempt = 0
        if main:
            assert self.events is not None
            previous = self.events.records()
            self.attempt = len(rundir.of(previous, rundir.START))
            self._write_config()
            self._grace.from_history(previous)

    # -- building blocks -------------------------------------------------------------------
    def optimizer(self) -> OptimizerArg:
        """The optimizer ``cfg.optim`` describes, as a factory ``setup`` applies after wrapping."""
        return optimizer_factory(self.cfg.optim)

    def setup(self, model: nn.Module, optimizer: OptimizerArg, *, units: list[nn.Module] | None = None
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wraps for the strategy (DDP/FSDP2/ZeRO) and attaches the configured LR schedule.

        ``units`` are the blocks to shard and recompute one by one; default: the members of
        every ``nn.ModuleList``.
        """
        model, opt = self.strategy.setup(model, optimizer, units)
        self.model = model
        self.scheduler = scheduler(
            self.strategy.torch_optimizer(opt), self.cfg.optim, self.cfg.trainer.max_steps
        )
        return model, opt

    def loader(self, stream: Any, *, transform: Any = None) -> Any:
        """This rank's share of ``stream``, in micro-batches, resumable mid-epoch."""
        from trainkit.data import Loader

        return Loader(
            stream,
            batch_size=self.cfg.data.batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            grad_accum=self.cfg.trainer.grad_accum,
            seed=self.cfg.seed,
            num_workers=self.cfg.data.num_workers,
            transform=transform,
            device=self.dist.device,
        )

    def stream(self, url: str) -> Any:
        """A :class:`trainkit.data.Stream` over ``url`` with this run's cache settings."""
        from trainkit.data import Stream

        d = self.cfg.data
        return Stream(
            url, cache_dir=d.cache_dir or None, cache_bytes=d.cache_bytes, shuffle=d.shuffle,
            shuffle_window=d.shuffle_window, prefetch=None if d.prefetch < 0 else d.prefetch,
            format=None if d.format == "auto" else d.format,
        )

    # -- state -----------------------------------------------------------------------------
    def restore(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, data: Any = None,
                **extra: Any) -> int | None:
        """Registers the state tree and loads the latest committed checkpoint, if any.

        Returns the step resumed from (None for a fresh run). ``extra`` takes more objects
        with ``state_dict``/``load_state_dict`` to save alongside.
        """
        from trainkit.checkpoint import RankLocal, RNGState

        state = self.strategy.checkpoint_state(model, optimizer)
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if data is not None:
            state["data"] = data
        state["trainer"] = _Counters(self)
        state["log_window"] = RankLocal(self._window)
        state["rng"] = RNGState()
        state.update(extra)
        self._state = state
        c = self.cfg.checkpoint
        if not c.enabled:
            self._warm_start(model, optimizer, None)
            seed_everything(self.cfg.seed + self.dist.rank)
            return None
        from trainkit.checkpoint import SavePolicy

        self.checkpointer = self.strategy.checkpointer(
            storage.join(self.run_dir, "checkpoints"), keep_last=c.keep_last, keep_every=c.keep_every,
            async_save=c.async_save, overlap_staging=c.overlap_staging, io_threads=c.io_threads,
        )
        # With overlap_staging the host copy of a save runs during the next forward/backward;
        # parameters and optimizer state change only in the optimizer step, which waits for it.
        inner = self.strategy.torch_optimizer(optimizer)
        if isinstance(inner, torch.optim.Optimizer):
            inner.register_step_pre_hook(self._wait_staged)
        self.save_policy = SavePolicy(c.every_steps, c.every_seconds)
        self._check_config_change()
        t_load = time.perf_counter()
        step = self.checkpointer.load(state)
        load_s = time.perf_counter() - t_load
        if step is None:
            # The run's own checkpoint always wins: a preempted fine-tune resumes where it was.
            self._warm_start(model, optimizer, self.checkpointer.process_group)
            seed_everything(self.cfg.seed + self.dist.rank)
            return None
        self.restored_step = step
        if self.dist.is_main:
            assert self.metrics is not None
            dropped = self.metrics.keep(lambda r: r.get("step", 0) <= step)
            reached = max((r.get("step", 0) for r in dropped), default=step)
            # Steps the previous attempt logged past this checkpoint (exact with log_every=1).
            times = [r["time"] for r in dropped if isinstance(r.get("time"), (int, float))]
            self._event(rundir.RESTORE, step=step, recomputed_steps=max(0, reached - step), load_s=load_s,
                        dropped_until=max(times, default=None))
            self._print(f"resumed from checkpoint at step {step}")
        return step

    def _warm_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, group: Any) -> None:
        c = self.cfg.checkpoint
        if not c.load_from:
            return
        from trainkit.checkpoint.warm import warm_start

        line = warm_start(model, optimizer, c.load_from, load_optimizer=c.load_optimizer, strict=c.strict,
                          process_group=group)
        self._event(rundir.WARM_START, source=c.load_from, load_optimizer=c.load_optimizer)
        self._print(line)

    def _check_config_change(self) -> None:
        """Refuses (one line, exit 2) to resume a checkpoint under a config that changes its
        state tree. Rank 0 knows the attempt; every rank raises the same error."""
        assert self.checkpointer is not None
        if self.checkpointer.latest_step() is None:
            return
        from trainkit.checkpoint.config_change import check_resume_config

        problem = None
        if self.dist.is_main and self.attempt > 0:
            try:
                check_resume_config(self._previous_config(), self.cfg.to_dict(),
                                    allow=self.cfg.checkpoint.allow_config_change, where=self.run_dir)
            except ConfigError as exc:
                problem = str(exc)
        problem = distributed.broadcast_object(problem, self.checkpointer.process_group)
        if problem:
            raise ConfigError(problem)

    def _previous_config(self) -> dict[str, Any] | None:
        """The config the previous attempt resolved (``configs/attempt-<n-1>.yaml``), or None."""
        import yaml

        text = rundir.read_bytes(rundir.path(self.run_dir, rundir.attempt_config(self.attempt - 1)))
        return yaml.safe_load(text) if text else None

    def _wait_staged(self, *_: Any) -> None:
        if self.checkpointer is not None:
            self._window.timers["checkpoint_block_s"] += self.checkpointer.staged()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.micro = int(state["micro"])

    # -- the loop ----------------------------------------------------------------------------
    def steps(self, data: Any, *, tokens_per_sample: int = 0, flops_per_sample: float = 0.0) -> Iterator[Any]:
        """Yields micro-batches until ``max_steps`` or an agreed preemption stop.

        Between optimizer steps it logs, saves on the checkpoint policy and checks, with one
        collective, whether any rank was told to stop. ``tokens_per_sample`` adds tokens/s to
        the metrics; ``flops_per_sample`` (forward + backward) adds MFU where the device's
        peak is known.
        """
        if self._state is None:
            seed_everything(self.cfg.seed + self.dist.rank)
        self._tokens_per_sample = tokens_per_sample
        self._mfu_per_sample = _mfu_scale(flops_per_sample, self.dist, self.cfg.trainer.precision)
        self._event(rundir.START, attempt=self.attempt, step=self.step, world_size=self.dist.world_size,
                    strategy=self.cfg.strategy.name, startup_s=time.time() - self._start,
                    nodes=max(1, self.dist.world_size // max(1, self.dist.local_world_size)))
        self._data = data
        cfg = self.cfg.trainer
        self.progress = Progress(cfg.progress, cfg.max_steps, self.step, self.dist.is_main)
        self._window.resume(self.step)
        it = iter(data)
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                batch = next(it)
                self._window.timers["data_wait_s"] += time.perf_counter() - t0
                yield batch
                if self._stepped:
                    self._stepped = False
                    self._after_step()
        finally:
            self.progress.close()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.strategy.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.micro += 1
        self._window.add(loss)
        self.strategy.backward(loss, sync=self.micro % self.cfg.trainer.grad_accum == 0)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Steps on accumulation boundaries; a no-op on the micro-steps in between."""
        if self.micro % self.cfg.trainer.grad_accum:
            self.strategy.micro_step()
            return
        self._grad_norm = self.strategy.optimizer_step(optimizer)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self._stepped = True

    def _after_step(self) -> None:
        cfg = self.cfg
        self._note_commit()
        if self.step % cfg.trainer.log_every == 0 or self.step == cfg.trainer.max_steps:
            self._log()
        else:
            self.progress.update(self.step, None)
        policy = self.save_policy
        # Step-based saves are the same on every rank; only a timer needs the agreement.
        by_step = policy is not None and policy.due_by_step(self.step)
        by_time = policy is not None and policy.due_by_time()
        decision = self.agreement.decide(self.watcher.requested, by_time)
        if decision.stop:
            self._preempt()
        due = by_step or decision.save
        if due and self.step < cfg.trainer.max_steps:
            policy.mark_saved(self.step)
            self.save(blocking=False)
        every = cfg.checkpoint.export_every_steps
        if every and self.step % every == 0 and self.step < cfg.trainer.max_steps and self.model is not None:
            self.strategy.export(self.model, rundir.path(self.run_dir, rundir.step_export(self.step)))

    def _log(self, *, regular: bool = True) -> None:
        """Writes a metrics record for the steps since the last regular one.

        A record written off the regular steps (at a preemption stop) leaves the window open,
        so the next regular record covers the same steps as in an uninterrupted run.
        """
        loss_sum, count, timers, elapsed, steps = self._window.read(self.step)
        device = self.dist.device
        # Everything a record reads from the device, in one collective and one transfer.
        norm = self._grad_norm
        norm = torch.as_tensor(-1.0 if norm is None else norm, device=device).to(torch.float64).reshape(1)
        # The norm is the same on every rank: its maximum is it, exactly.
        peaks = torch.cat([torch.tensor([_memory_peak(device)], dtype=torch.float64, device=device), norm])
        (loss,), (mem, grad_norm) = distributed.mean_and_max((loss_sum / max(1, count)).reshape(1), peaks)
        elapsed = max(elapsed, 1e-9)
        samples = steps * self.cfg.data.batch_size
        per_step = {k: v / max(1, steps) for k, v in timers.items()}
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0] if self.scheduler else None,
            "samples_per_s": samples / elapsed,
            "step_time_s": elapsed / max(1, steps),
            **per_step,
            "compute_s": elapsed / max(1, steps) - sum(per_step.values()),
            "mem_peak_bytes": int(mem),
            "time": time.time(),
            "attempt": self.attempt,
        }
        position = getattr(self._data, "position", None)
        if position is not None:
            # Global samples consumed: with exactly-once data this is step x batch_size.
            record["samples_seen"] = int(position)
        if self._tokens_per_sample:
            record["tokens_per_s"] = record["samples_per_s"] * self._tokens_per_sample
        if self._mfu_per_sample:
            record["mfu"] = record["samples_per_s"] * self._mfu_per_sample
        if self._grad_norm is not None:
            record["grad_norm"] = grad_norm
        if regular:
            self._window.reset(self.step)
        self._last_record = record
        if self.metrics is not None:
            self.metrics.write(record)
        for logger in self.loggers:
            logger.log(record, self.step)
        self.progress.update(self.step, record)

    def save(self, *, blocking: bool) -> None:
        """Checkpoints the registered state tree at the current step (all ranks call this)."""
        if self.checkpointer is None or self._state is None:
            return
        t0 = time.perf_counter()
        if self.model is not None:
            self.strategy.before_save(self.model)
        self.checkpointer.save(self.step, self._state, blocking=blocking)
        spent = time.perf_counter() - t0
        self._window.timers["checkpoint_block_s"] += spent
        self._grace.started(self.step, t0)
        self._event(rundir.CHECKPOINT, step=self.step, blocking_s=spent, blocking=blocking)

    def _note_commit(self) -> None:
        """Records each save once it is durable, with the training step by which it was. An
        async save commits a few steps after it was taken; a failure in between resumes from
        the save before it, so those steps are redone on top of the interval."""
        commits = self.checkpointer.commits if self.checkpointer is not None else []
        for step in commits[self._noted_commits:]:
            self._event(rundir.CHECKPOINT_COMMITTED, step=step, at_step=self.step)
            self._grace.committed(step, self.step)
        self._noted_commits = len(commits)

    def _preempt(self) -> None:
        if self._last_record.get("step") != self.step:
            self._log(regular=False)  # so the record of useful time reaches the stop step
        reason = self.watcher.reason or "another rank was preempted"
        self._print(f"preemption ({reason}): saving at step {self.step}, then exiting with code 75")
        self.agreement.drain()
        if self.checkpointer is not None and self._state is not None:
            t0 = time.perf_counter()
            self.checkpointer.wait()
            if self.checkpointer.latest_step() != self.step:
                self.save(blocking=True)
            self._note_commit()
            self._grace.emergency(self.step, time.perf_counter() - t0)
        self._event(rundir.PREEMPTED, step=self.step, reason=reason)
        self._close()
        raise Preempted(f"preempted at step {self.step} ({reason}); relaunch to resume")

    # -- the end -------------------------------------------------------------------------
    def finish(self, **final: Any) -> dict[str, Any]:
        """Final checkpoint and export, ``summary.json``, the summary table; ends the run."""
        self.agreement.drain()
        if self.checkpointer is not None and self._state is not None:
            self.checkpointer.wait()
            if self.checkpointer.latest_step() != self.step:
                self.save(blocking=True)
            self._note_commit()
        if self.cfg.checkpoint.export_safetensors and self.model is not None:
            self.strategy.export(self.model, rundir.path(self.run_dir, rundir.EXPORT))
        wall = time.time() - self._start
        summary: dict[str, Any] = {
            "run_dir": self.run_dir,
            "strategy": self.cfg.strategy.name,
            "world_size": self.dist.world_size,
            "steps": self.step,
            "resumed_from": self.restored_step,
            "wall_s": wall,
        }
        summary.update({k: self._last_record[k] for k in ("loss", "samples_per_s") if k in self._last_record})
        summary.update(final)
        if self.dist.is_main:
            # Written first, so that the accounting of the whole run ends with it.
            self._event(rundir.FINISH, step=self.step)
            summary.update(self._accounting())
            _put(rundir.path(self.run_dir, rundir.SUMMARY), json.dumps(summary, indent=2))
            self._print(format_summary(summary))
        self._close()
        return summary

    def _accounting(self) -> dict[str, Any]:
        """The whole run's goodput, badput buckets and, with a price, its cost: every attempt,
        from the run's own logs (rank 0 holds them)."""
        from trainkit.cost import bill, goodput

        assert self.metrics is not None and self.events is not None
        g = goodput(self.metrics.records(), self.events.records())
        out: dict[str, Any] = {key: g[key] for key in ("goodput", "steady_goodput", "useful_s")}
        out.update(run_wall_s=g["wall_s"], attempts=g["attempts"], badput_s=g["badput_s"])
        price = self.cfg.cost.price()
        if price is not None:
            cost = bill(g, price)
            out.update(cost_usd=cost["usd"], cost=cost)
        return out

    def _close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.watcher.stop()
        for logger in self.loggers:
            logger.close()
        for log in (self.metrics, self.events):
            if log is not None:
                log.close()
        distributed.shutdown()

    # -- helpers -----------------------------------------------------------------------------
    def _event(self, kind: rundir.Event, **fields: Any) -> None:
        if self.events is not None:
            self.events.write(rundir.event(kind, time.time(), **fields))
            for logger in self.loggers:
                if hasattr(logger, "event"):
                    logger.event(kind.name, fields.get("step"), **{k: v for k, v in fields.items() if k != "step"})

    def _print(self, text: str) -> None:
        if self.dist.is_main:
            progress = getattr(self, "progress", None)
            if progress is not None:
                progress.message(text)
            else:
                print(text, flush=True)

    def _write_config(self) -> None:
        """The resolved config, credentials redacted: as ``config.yaml`` and as this attempt's."""
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(redact(self.cfg.to_dict())))
        _put(rundir.path(self.run_dir, rundir.attempt_config(self.attempt)), text)
        _put(rundir.path(self.run_dir, rundir.CONFIG), text)


def _put(url: str, text: str) -> None:
    fs, path = storage.filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if storage.is_local(url):
        fs.makedirs(parent, exist_ok=True)
    storage.retry(lambda: fs.pipe(path, text.encode()), what=url)


def _memory_peak(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _mfu_scale(flops_per_sample: float, dist_info: distributed.DistInfo, precision: str) -> float:
    """MFU per (sample/s): training FLOPs per sample over the whole job's peak FLOP/s."""
    if not flops_per_sample:
        return 0.0
    from trainkit.metrics.mfu import peak_flops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    peak = peak_flops(dist_info.device, dtype)
    return flops_per_sample / (peak * dist_info.world_size) if peak else 0.0


class _Counters:
    """The loop's counters as a state-tree member."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state)


def _single_process_group(cfg: Config) -> distributed.DistInfo:
    import os

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(distributed.free_port()), "RANK": "0", "WORLD_SIZE": "1",
         "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    )
    info = distributed.init(cfg.strategy.backend, threads=cfg.trainer.threads)
    if not info.distributed:
        raise ConfigError(f"strategy={cfg.strategy.name} could not start a process group")
    return info
