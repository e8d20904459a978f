"""What Ray sees of a trainkit run: its logged metrics and committed checkpoints, through ``ray.train.report``.

``ray.train.report`` and ``ray.train.get_preemption_info`` are barriers: every worker must
call them the same number of times. Both therefore run as boundary hooks of trainkit's
step agreement (:func:`trainkit.preemption.add_boundary_hook`): a rank raises a flag, the
flag travels in the agreement's all-reduce, and every rank makes the call at the same step
boundary, one step later. Nothing here touches the device: records are the Python values
trainkit already read on its logging steps.

* :class:`RayReporter` sends the logged records (rank 0's, handed over by
  :class:`RayReportLogger`) and the committed checkpoints, at most one report every
  ``REPORT_GAP_S`` (the newest record and checkpoint since the last one; the run's end
  always reports). Ray's worker hands each report to its controller through a queue of one,
  emptied at the controller's poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default):
  a report made sooner waits for that poll, which, made at every step, held each step
  ~0.5 s on the project's 2-core machine. A checkpoint reaches Ray as a
  *pointer*: a directory under Ray's experiment directory holding ``trainkit_checkpoint.json``
  (the run_dir checkpoint's URL and step), reported with ``CheckpointUploadMode.NO_UPLOAD``,
  so Ray copies nothing. Ray keeps a checkpoint only under its own storage path, hence the
  small directory instead of the run_dir checkpoint itself. trainkit never resumes from it:
  its ``latest`` pointer stays the truth.
* :class:`PreemptionProbe` asks Ray Train whether a node of the group is being preempted,
  every ``every_s`` seconds of training at the latest (the due flag is raised by each rank's
  clock and agreed like the rest), and turns a notice into trainkit's agreed stop.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from trainkit import rundir
from trainkit.preemption.watcher import drain_reason

log = logging.getLogger(__name__)

# Longer than Ray's default controller poll (2 s), so a report never waits for the previous one.
REPORT_GAP_S = 2.5
POINTER_FILE = "trainkit_checkpoint.json"
POINTER_FORMAT = "trainkit-checkpoint-pointer/1"
# The logger the Ray worker adds to ``trainer.loggers`` (rank 0 builds it; it feeds the reporter).
LOGGER = f"{__name__}:RayReportLogger"

_ACTIVE: RayReporter | None = None


class RayReporter:
    """Rank 0 collects; every rank reports at the agreed boundaries (a boundary hook)."""

    def __init__(self, run_dir: str, rank: int, gap_s: float = REPORT_GAP_S) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.gap_s = gap_s
        self._last_report = -gap_s
        self._pending: dict[str, Any] = {}
        self._batch: dict[str, Any] = {}
        self._last_record: dict[str, Any] = {}
        self.reports = 0

    # -- fed by RayReportLogger, on rank 0 ---------------------------------------------------
    def record(self, record: dict[str, Any]) -> None:
        self._last_record = dict(record)
        self._pending["metrics"] = self._last_record

    def committed(self, step: int) -> None:
        self._pending["checkpoint_step"] = max(step, self._pending.get("checkpoint_step", -1))

    # -- the boundary hook -------------------------------------------------------------------
    def due(self) -> bool:
        """Rank 0 wishes when it holds something new and the last report is ``gap_s`` old;
        what it holds then is what it sends."""
        if not self._pending or time.monotonic() - self._last_report < self.gap_s:
            return False
        self._batch, self._pending = self._pending, {}
        return True

    def act(self) -> bool:
        batch, self._batch = self._batch, {}
        self._report(batch.get("metrics") or {}, batch.get("checkpoint_step"))
        return False

    def final(self, summary: dict[str, Any] | None) -> None:
        """The last report, on every rank, once the run has ended: the last record, the summary's
        figures and the final checkpoint (the training function's end is the last boundary)."""
        batch, self._pending = self._pending, {}
        metrics = {**self._last_record, **_plain(summary or {})}
        self._report(metrics, batch.get("checkpoint_step"))

    def _report(self, metrics: dict[str, Any], checkpoint_step: int | None) -> None:
        import ray.train

        checkpoint = None
        if self.rank == 0 and checkpoint_step is not None:
            checkpoint = self._pointer(checkpoint_step)
            metrics = {**metrics, "checkpoint_step": checkpoint_step}
        ray.train.report(metrics if self.rank == 0 else {}, checkpoint=checkpoint,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        self._last_report = time.monotonic()
        self.reports += 1

    def _pointer(self, step: int) -> Any:
        """A directory in Ray's experiment directory that names the run_dir checkpoint of ``step``."""
        import ray.train

        from trainkit import _compat

        experiment, fs = _compat.ray_train_storage()
        path = f"{experiment.rstrip('/')}/trainkit-{rundir.step_dir(step)}"
        fs.create_dir(path, recursive=True)
        body = {"format": POINTER_FORMAT, "step": step, "run_dir": self.run_dir,
                "checkpoint": rundir.path(self.run_dir, f"{rundir.CHECKPOINTS}/{rundir.step_dir(step)}")}
        with fs.open_output_stream(f"{path}/{POINTER_FILE}") as out:
            out.write(json.dumps(body, indent=2).encode())
        return ray.train.Checkpoint(path=path, filesystem=fs)


def _plain(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's numbers (Ray's metrics are a flat dict; run_dir and names stay in summary.json)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RayReportLogger:
    """A trainkit logger (``trainer.loggers``) that hands rank 0's records and commits to the reporter."""

    def log(self, record: dict[str, Any], step: int) -> None:
        if _ACTIVE is not None:
            _ACTIVE.record(record)

    def event(self, kind: str, step: int | None, **fields: Any) -> None:
        if _ACTIVE is not None and kind == rundir.CHECKPOINT_COMMITTED.name and step is not None:
            _ACTIVE.committed(int(step))

    def close(self) -> None:
        pass


class PreemptionProbe:
    """``ray.train.get_preemption_info()`` at agreed boundaries, at most every ``every_s`` seconds."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._next = time.monotonic() + every_s
        self.reason: str | None = None

    def due(self) -> bool:
        return self.reason is None and time.monotonic() >= self._next

    def act(self) -> bool:
        import ray.train

        self._next = time.monotonic() + self.every_s
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        self.reason = drain_reason(info.preempted_node_ids, info.deadline_ms)
        from trainkit.preemption import request

        request(self.reason)
        return True


def in_train_worker() -> bool:
    """Whether this process runs a Ray Train worker (asking outside one would start a Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return False
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # noqa: BLE001 - not in a Ray Train worker
        return False


class RayBridge:
    """The hooks of one training function call in a Ray Train worker (none outside one)."""

    def __init__(self, run_dir: str, poll_s: float) -> None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        self.reporter = RayReporter(run_dir, rank)
        self.probe = PreemptionProbe(poll_s)

    def start(self) -> RayBridge:
        from trainkit.preemption import add_boundary_hook

        global _ACTIVE
        _ACTIVE = self.reporter
        add_boundary_hook(self.reporter)
        add_boundary_hook(self.probe)
        return self

    def stop(self) -> None:
        from trainkit.preemption import remove_boundary_hook

        global _ACTIVE
        remove_boundary_hook(self.reporter)
        remove_boundary_hook(self.probe)
        if _ACTIVE is self.reporter:
            _ACTIVE = None
