"""Tracker loggers: TensorBoard event files (local and remote run_dir), lazy wandb/mlflow."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainkit.errors import ConfigError
from trainkit.metrics.loggers import (LOGGERS, Logger, MLflowLogger, TensorBoardLogger, WandbLogger,
                                      build_loggers, scalars)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORDS = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "samples_per_s": 100.0 + s, "time": 1.7e9 + s,
            "attempt": 0, "mem_peak_bytes": 123, "grad_norm": None, "note": "x", "flag": True}
           for s in (10, 20, 30)]


def read_scalars(directory: str) -> EventAccumulator:
    acc = EventAccumulator(directory)
    acc.Reload()
    return acc


def test_scalars_keeps_only_measurements():
    assert scalars(RECORDS[0]) == {"loss": 0.2, "lr": 1e-3, "samples_per_s": 110.0, "mem_peak_bytes": 123.0}


def test_tensorboard_local(tmp_path):
    (logger,) = build_loggers(["tensorboard"], str(tmp_path), {})
    assert isinstance(logger, TensorBoardLogger) and isinstance(logger, Logger)
    for r in RECORDS:
        logger.log(r, r["step"])
    logger.event("checkpoint", step=20, blocking_s=0.1)
    logger.close()
    logger.close()  # idempotent
    acc = read_scalars(str(tmp_path / "tensorboard"))
    assert set(acc.Tags()["scalars"]) == {"loss", "lr", "samples_per_s", "mem_peak_bytes"}
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([0.2, 0.1, 2 / 30])
    assert loss[0].wall_time == pytest.approx(1.7e9 + 10)


def test_tensorboard_remote_run_dir_uploads(tmp_path):
    run_dir = "memory://trainkit-tb-tests/run1"
    logger = TensorBoardLogger(run_dir, flush_seconds=3600)
    logger.log(RECORDS[0], 10)
    fs = fsspec.filesystem("memory")
    logger.flush()  # explicit flush uploads
    uploaded = fs.ls("/trainkit-tb-tests/run1/tensorboard", detail=False)
    assert len(uploaded) == 1 and "tfevents" in uploaded[0]
    for r in RECORDS[1:]:
        logger.log(r, r["step"])
    logger.close()
    assert not os.path.exists(logger.local_dir) or os.listdir(logger.local_dir)  # local copy only
    local = tmp_path / "tb"
    local.mkdir()
    for path in fs.ls("/trainkit-tb-tests/run1/tensorboard", detail=False):
        (local / path.rsplit("/", 1)[-1]).write_bytes(fs.cat_file(path))
    acc = read_scalars(str(local))
    assert [e.step for e in acc.Scalars("samples_per_s")] == [10, 20, 30]


def test_trackers_are_not_imported_unless_enabled(tmp_path):
    # A meta-path hook records any attempt to import wandb or mlflow, installed or not.
    code = f"""
import sys
tried = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('wandb', 'mlflow'):
            tried.append(name)
        return None
sys.meta_path.insert(0, Spy())
from trainkit.metrics.loggers import build_loggers
for lg in build_loggers(['tensorboard'], {str(tmp_path)!r}, {{}}):
    lg.log({{'loss': 1.0}}, 1); lg.close()
assert not tried, tried
assert 'wandb' not in sys.modules and 'mlflow' not in sys.modules
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_tracker_is_a_config_error(monkeypatch, tmp_path, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match=rf"pip install trainkit\[{name}\]"):
        build_loggers([name], str(tmp_path), {})


def test_unknown_logger_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="valid: mlflow, tensorboard, wandb"):
        build_loggers(["tensorbored"], str(tmp_path), {})
    assert LOGGERS.names() == ["mlflow", "tensorboard", "wandb"]


def test_wandb_logger_with_a_stand_in_module(monkeypatch, tmp_path):
    calls: list = []

    class FakeRun:
        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (logger,) = build_loggers(["wandb"], str(tmp_path), {"wandb": {"project": "p", "name": "n"}})
    assert isinstance(logger, WandbLogger)
    logger.log(RECORDS[0], 10)
    logger.close()
    logger.close()
    init = calls[0][1]
    assert init["project"] == "p" and init["name"] == "n" and init["resume"] == "allow"
    assert init["dir"] == str(tmp_path)
    assert calls[1] == ("log", scalars(RECORDS[0]), 10)
    assert calls[2:] == [("finish",)]


def test_mlflow_logger_with_a_stand_in_module(monkeypatch, tmp_path):
    calls: list = []
    fake = types.ModuleType("mlflow")
    for fn in ("set_tracking_uri", "set_experiment", "set_tag", "log_params", "log_metrics", "log_metric",
               "end_run"):
        setattr(fake, fn, lambda *a, _fn=fn, **kw: calls.append((_fn, a, kw)))
    fake.start_run = lambda **kw: calls.append(("start_run", (), kw)) or object()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    (logger,) = build_loggers(["mlflow"], str(tmp_path), {"mlflow": {"experiment": "e",
                                                                       "tracking_uri": "file:///x"}})
    assert isinstance(logger, MLflowLogger)
    logger.log(RECORDS[1], 20)
    logger.close()
    names = [c[0] for c in calls]
    assert names == ["set_tracking_uri", "set_experiment", "start_run", "set_tag", "log_metrics", "end_run"]
    assert calls[4] == ("log_metrics", (scalars(RECORDS[1]),), {"step": 20})
