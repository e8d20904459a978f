"""Preemption-safe checkpoints for a Hugging Face Accelerate loop that stays the user's own.

A few lines around an existing loop (docs/quickstart.md, "Bring your Accelerate loop")::

    ckpt = AcceleratorCheckpoints(accelerator, "s3://bucket/runs/mine", every_steps=100)
    ckpt.restore(model=model, optimizer=optimizer, scheduler=scheduler, data=loader)
    for batch in ckpt.steps(loader, max_steps=1000):      # one optimizer step per batch
        ...  # forward, accelerator.backward(loss), optimizer.step(), optimizer.zero_grad()
        ckpt.log(loss=loss)
    ckpt.finish()

What it brings, with trainkit's own machinery rather than ``accelerator.save_state``:

* saves of the prepared objects (model, optimizer, scheduler, Accelerate's loss scaler, the
  data position, every RNG stream, the step) through trainkit's commit protocol: sharded DCP
  straight to any fsspec URL, a checkpoint exists once its manifest is written, ``latest``
  moves after; async by default;
* ``restore`` of the latest committed step, the data position included when the data is a
  trainkit :class:`~trainkit.data.Loader` (``ckpt.loader(...)`` builds one for this rank);
* SIGTERM/SIGINT/SIGUSR1 or a spot notice (AWS/GCP endpoints, as in ``preemption.*``) becomes
  a stop step all processes agree on, an emergency save and ``Preempted`` (exit 75);
* ``metrics.jsonl`` and ``events.jsonl`` in the run directory, as a ``trainkit.Run`` writes
  them (the records past the restored step are dropped on resume, so they read as one run).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from trainkit import rundir, storage
from trainkit.errors import Preempted

# Helpers built in this process: ``python -m trainkit.launch script=`` accepts a script that
# made one of these instead of a trainkit.Run.
created = 0


class _Step:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])


class AcceleratorCheckpoints:
    """trainkit's checkpoints, resume and preemption stop for objects ``accelerator.prepare`` made.

    Every process builds one with the same arguments, after ``accelerator`` (which set up the
    process group) and before the loop.
    """

    def __init__(self, accelerator: Any, run_dir: str, *, every_steps: int = 0, every_seconds: float = 0.0,
                 keep_last: int = 2, async_save: bool = True,
                 signals: Iterable[str] = ("SIGTERM", "SIGINT", "SIGUSR1"), aws_endpoint: str = "",
                 gcp_endpoint: str = "", poll_seconds: float = 5.0, agree_every_s: float = 0.5) -> None:
        global created
        from trainkit.checkpoint import Checkpointer, SavePolicy
        from trainkit.metrics import JsonlLog
        from trainkit.preemption import PreemptionWatcher, StepAgreement

        created += 1
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        main = accelerator.is_main_process
        self._counter = _Step()
        self._state: dict[str, Any] | None = None
        self.restored_step: int | None = None
        self.checkpointer = Checkpointer(storage.join(run_dir, rundir.CHECKPOINTS), keep_last=keep_last,
                                         async_save=async_save)
        self.policy = SavePolicy(every_steps, every_seconds)
        self.watcher = PreemptionWatcher(signals=list(signals), aws_endpoint=aws_endpoint,
                                         gcp_endpoint=gcp_endpoint, poll_seconds=poll_seconds).start()
        self.agreement = StepAgreement(self.watcher, every_s=agree_every_s)
        self.metrics = JsonlLog(run_dir, rundir.METRICS) if main else None
        self.events = JsonlLog(run_dir, rundir.EVENTS) if main else None
        self.attempt = len(rundir.of(self.events.records(), rundir.START)) if self.events is not None else 0
        self._noted = 0

    @property
    def step(self) -> int:
        """Optimizer steps done (inside the loop body: the step being run, counting from 1)."""
        return self._counter.step

    def loader(self, stream: Any, *, batch_size: int, seed: int = 0, num_workers: int = 0) -> Any:
        """This process's share of a :class:`~trainkit.data.Stream` (or its URL), resumable mid-epoch.

        ``batch_size`` is global (all processes); the order depends only on ``seed``.
        """
        from trainkit.data import Loader, Stream

        if isinstance(stream, str):
            stream = Stream(stream)
        return Loader(stream, batch_size=batch_size, rank=self.rank, world_size=self.world_size, seed=seed,
                      num_workers=num_workers, device=self.accelerator.device)

    def restore(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                data: Any = None, **extra: Any) -> int:
        """Registers what to save and loads the latest committed checkpoint; returns its step (0: fresh).

        ``model`` and ``optimizer`` as ``accelerator.prepare`` returned them; ``data`` is saved when
        it has ``state_dict``/``load_state_dict`` (a trainkit Loader does); ``extra`` takes more such
        objects.
        """
        from trainkit.checkpoint import ModelOptimState, RNGState

        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
        state: dict[str, Any] = {"model_optim": ModelOptimState(model, inner), "trainer": self._counter,
                                 "rng": RNGState()}
        if scheduler is not None:
            state["scheduler"] = getattr(scheduler, "scheduler", scheduler)
        if getattr(self.accelerator, "scaler", None) is not None:
            state["scaler"] = self.accelerator.scaler
        if data is not None and hasattr(data, "state_dict"):
            state["data"] = data
        state.update(extra)
        self._state = state
        step = self.checkpointer.load(state)
        if step is None:
            return 0
        self.restored_step = step
        if self.metrics is not None:
            dropped = self.metrics.keep(lambda r: r.get("step", 0) <= step)
            reached = max((r.get("step", 0) for r in dropped), default=step)
            self._event(rundir.RESTORE, step=step, recomputed_steps=max(0, reached - step))
        return step

    def steps(self, data: Iterable[Any], *, max_steps: int) -> Iterator[Any]:
        """Yields one batch per optimizer step until ``max_steps`` or an agreed preemption stop.

        After each step it saves on the policy and checks, with one collective (answered a
        step later, so the loop never waits for it), whether any process was told to stop; then
        every process saves at the same step and ``Preempted`` (exit 75) ends the script.
        """
        self._event(rundir.START, attempt=self.attempt, step=self.step, world_size=self.world_size,
                    strategy="accelerate-loop")
        it = iter(data)
        while self.step < max_steps:
            batch = next(it)
            self._counter.step += 1
            yield batch
            self._boundary(max_steps)

    def log(self, **values: Any) -> None:
        """Writes a metrics record for the current step (rank 0; averages tensors over processes).

        Reading a device tensor waits for the device: call it on the steps you want logged.
        """
        record: dict[str, Any] = {"step": self.step}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = float(self.accelerator.reduce(value.detach().float(), reduction="mean"))
            record[key] = value
        record["time"] = time.time()
        if self.metrics is not None:
            self.metrics.write(record)

    def save(self, *, blocking: bool) -> None:
        """Checkpoints the registered objects at the current step (every process calls it)."""
        if self._state is None:
            raise RuntimeError("call restore(model=..., optimizer=...) before saving")
        t0 = time.perf_counter()
        self.checkpointer.save(self.step, self._state, blocking=blocking)
        self._event(rundir.CHECKPOINT, step=self.step, blocking_s=time.perf_counter() - t0, blocking=blocking)

    def _boundary(self, max_steps: int) -> None:
        self._note_commits()
        decision = self.agreement.decide(self.watcher.requested, self.policy.due_by_time())
        if decision.stop:
            self._preempt()
        if (self.policy.due_by_step(self.step) or decision.save) and self.step < max_steps:
            self.policy.mark_saved(self.step)
            self.save(blocking=False)

    def _preempt(self) -> None:
        reason = self.watcher.reason or "another process was preempted"
        if self.accelerator.is_main_process:
            print(f"preemption ({reason}): saving at step {self.step}, then exiting with code 75", flush=True)
        self.agreement.drain()
        self._final_save()
        self._event(rundir.PREEMPTED, step=self.step, reason=reason)
        self._close()
        raise Preempted(f"preempted at step {self.step} ({reason}); relaunch to resume")

    def finish(self) -> None:
        """The final checkpoint (unless the last save is of this step); closes the run's files."""
        self.agreement.drain()
        self._final_save()
        self._event(rundir.FINISH, step=self.step)
        self._close()

    def _final_save(self) -> None:
        self.checkpointer.wait()
        if self._state is not None and self.checkpointer.latest_step() != self.step:
            self.save(blocking=True)
        self._note_commits()

    def _note_commits(self) -> None:
        commits = self.checkpointer.commits
        for step in commits[self._noted:]:
            self._event(rundir.CHECKPOINT_COMMITTED, step=step, at_step=self.step)
        self._noted = len(commits)

    def _event(self, kind: rundir.Event, **fields: Any) -> None:
        if self.events is not None:
            self.events.write(rundir.event(kind, time.time(), **fields))

    def _close(self) -> None:
        self.checkpointer.close()
        self.watcher.stop()
        for log in (self.metrics, self.events):
            if log is not None:
                log.close()
