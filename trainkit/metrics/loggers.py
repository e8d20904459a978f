"""Optional experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow.

``metrics.jsonl`` / ``events.jsonl`` in ``run_dir`` stay the record of a run (the report reads
them); a :class:`Logger` mirrors the same records into a tracker's UI. Trackers are picked by
name (``build_loggers(["tensorboard", "wandb"], run_dir, options)``); a tracker's package is
imported only when its logger is constructed, so an unused one costs nothing and a missing
one is a clear :class:`~trainkit.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import numbers
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from trainkit import rundir, storage
from trainkit.components import LOGGERS
from trainkit.errors import ConfigError
from trainkit.options import build

# Keys that describe a record rather than measure something.
_SKIP = frozenset({"step", "time", "attempt"})


@runtime_checkable
class Logger(Protocol):
    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Records the numeric entries of one metrics record at ``step``."""

    def close(self) -> None:
        """Flushes and releases the tracker; idempotent."""


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The plottable entries of a metrics record (numbers, not bools/None/bookkeeping keys)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in _SKIP and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"logger {extra!r} needs the {module!r} package, which is not installed: "
            f"pip install trainkit[{extra}]  (or pip install {module})"
        ) from exc


@dataclass
class LoggerOptions:
    """Base of a logger's options (``trainer.logger_options.<name>``); a logger class names
    its own as ``Options``. A plug-in without one is checked against its constructor."""

    def check(self, key: str) -> None:
        """Range checks; raise ConfigError naming ``key``."""


@dataclass
class TensorBoardOptions(LoggerOptions):
    flush_seconds: float = 30.0
    subdir: str = rundir.TENSORBOARD

    def check(self, key: str) -> None:
        if self.flush_seconds <= 0:
            raise ConfigError(f"{key}.flush_seconds={self.flush_seconds} must be > 0")


@dataclass
class WandbOptions(LoggerOptions):
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    notes: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None


@dataclass
class MLflowOptions(LoggerOptions):
    experiment: str | None = None
    tracking_uri: str | None = None
    run_name: str | None = None


class TensorBoardLogger:
    """TensorBoard event files in ``run_dir/tensorboard/``.

    For a remote ``run_dir`` (``s3://…``) the writer works in a local directory and the event
    files are uploaded into ``run_dir/tensorboard/`` on :meth:`flush` (at most every
    ``flush_seconds`` from :meth:`log`) and on :meth:`close`. Each writer's file name is
    unique (time, host, pid), so a resumed attempt adds a file instead of replacing one.
    """

    Options = TensorBoardOptions

    def __init__(self, run_dir: str, *, flush_seconds: float = 30.0, subdir: str = rundir.TENSORBOARD) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.url = storage.join(run_dir, subdir)
        self.remote = not storage.is_local(run_dir)
        if self.remote:
            key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
            self.local_dir = tempfile.mkdtemp(prefix=f"trainkit-tb-{key}-")
        else:
            self.local_dir = storage.local_path(self.url)
            os.makedirs(self.local_dir, exist_ok=True)
        self.flush_seconds = flush_seconds
        self._writer: Any = SummaryWriter(log_dir=self.local_dir, flush_secs=max(1, int(flush_seconds)))
        self._last_upload = time.monotonic()

    def log(self, record: Mapping[str, Any], step: int) -> None:
        for key, value in scalars(record).items():
            self._writer.add_scalar(key, value, global_step=step, walltime=record.get("time"))
        if self.remote and time.monotonic() - self._last_upload >= self.flush_seconds:
            self.flush()

    def event(self, kind: str, step: int | None = None, **fields: Any) -> None:
        text = ", ".join(f"{k}={v}" for k, v in fields.items() if k != "time")
        self._writer.add_text("events", f"{kind} {text}".strip(), global_step=step, walltime=fields.get("time"))

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        if self.remote:
            self._upload()

    def _upload(self) -> None:
        fs, root = storage.filesystem(self.url)
        for dirpath, _, files in os.walk(self.local_dir):
            rel = os.path.relpath(dirpath, self.local_dir)
            for name in files:
                src = os.path.join(dirpath, name)
                dst = "/".join(p for p in (root.rstrip("/"), "" if rel == "." else rel, name) if p)
                storage.retry(lambda src=src, dst=dst: fs.put_file(src, dst), what=f"{self.url}/{name}")
        self._last_upload = time.monotonic()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        if self.remote:
            self._upload()
        self._writer = None


class WandbLogger:
    """Weights & Biases: ``wandb.init(project=…, **kwargs)``; needs ``pip install trainkit[wandb]``.

    ``config`` is the run's resolved config with credentials redacted (trainkit.redact).
    """

    Options = WandbOptions

    def __init__(self, project: str | None = None, *, run_dir: str | None = None, name: str | None = None,
                 config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._wandb = _require("wandb", "wandb")
        if run_dir is not None and storage.is_local(run_dir):
            kwargs.setdefault("dir", storage.local_path(run_dir))
        # resume="allow" + a stable id derived from run_dir: a relaunch continues the same W&B run.
        if run_dir is not None:
            kwargs.setdefault("id", hashlib.sha1(run_dir.encode()).hexdigest()[:16])
            kwargs.setdefault("resume", "allow")
        self._run = self._wandb.init(project=project, name=name, config=dict(config or {}), **kwargs)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        self._run.log(scalars(record), step=step)

    def event(self, kind: str, step: int | None = None, **fields: Any) -> None:
        self._run.log({f"events/{kind}": 1}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MLflowLogger:
    """MLflow: logs to ``tracking_uri`` (default: MLflow's own), experiment ``experiment``.

    Needs ``pip install trainkit[mlflow]``.
    """

    Options = MLflowOptions

    def __init__(self, experiment: str | None = None, *, tracking_uri: str | None = None,
                 run_name: str | None = None, run_dir: str | None = None,
                 params: Mapping[str, Any] | None = None) -> None:
        self._mlflow = _require("mlflow", "mlflow")
        if tracking_uri:
            self._mlflow.set_tracking_uri(tracking_uri)
        if experiment:
            self._mlflow.set_experiment(experiment)
        self._run = self._mlflow.start_run(run_name=run_name)
        if run_dir is not None:
            self._mlflow.set_tag("trainkit.run_dir", run_dir)
        if params:
            self._mlflow.log_params(dict(params))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        self._mlflow.log_metrics(scalars(record), step=step)

    def event(self, kind: str, step: int | None = None, **fields: Any) -> None:
        self._mlflow.log_metric(f"events.{kind}", 1.0, step=step or 0)

    def close(self) -> None:
        if self._run is not None:
            self._mlflow.end_run()
            self._run = None


def logger_kwargs(name: str, options: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """The logger class for ``name`` and its checked keyword arguments."""
    key = f"trainer.logger_options.{name}"
    cls = LOGGERS.get(name, key="loggers")
    opts_cls = getattr(cls, "Options", None)
    given = dict(options or {})
    if opts_cls is not None:
        opts = build(opts_cls, given, key)
        opts.check(key)
        return cls, {k: v for k, v in dataclasses.asdict(opts).items() if v is not None}
    params = _parameters(cls)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in given if k not in params]
    if unknown and not takes_any:
        raise ConfigError(f"unknown key '{key}.{unknown[0]}'; valid keys in {key}: {', '.join(params)}")
    return cls, given


def check_logger_options(names: list[str] | tuple[str, ...], options: Mapping[str, Mapping[str, Any]]) -> None:
    """Validates ``trainer.loggers`` and ``trainer.logger_options`` before anything starts."""
    stray = [n for n in options if n not in names]
    if stray:
        raise ConfigError(f"trainer.logger_options.{stray[0]}: no such logger in trainer.loggers "
                          f"({', '.join(names) or 'none'})")
    for name in names:
        logger_kwargs(name, options.get(name))


def build_loggers(names: list[str] | tuple[str, ...], run_dir: str,
                  options: Mapping[str, Mapping[str, Any]] | None = None,
                  config: Mapping[str, Any] | None = None) -> list[Logger]:
    """One logger per name; ``options[name]`` are its checked keyword arguments.

    ``run_dir`` is passed to every logger that takes it, ``config`` (already redacted) to
    every logger that takes a ``config``. Unknown names raise a :class:`ConfigError`
    listing the valid ones (or ``package.module:Class`` for your own).
    """
    options = options or {}
    loggers: list[Logger] = []
    for name in names:
        cls, kwargs = logger_kwargs(name, options.get(name))
        params = _parameters(cls)
        if "run_dir" in params:
            kwargs.setdefault("run_dir", run_dir)
        if config is not None and "config" in params:
            kwargs.setdefault("config", dict(config))
        loggers.append(cls(**kwargs))
    return loggers


def _parameters(cls: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return {}
