"""The local launcher: same seed ⇒ same losses; a worker failure is reported once, non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from trainkit.launch.local import report_failure

from launching import RESNET_TINY, launch, losses

DDP2 = ["strategy=ddp", "launcher.workers=2", "trainer.max_steps=8", "checkpoint.enabled=false"]


@pytest.mark.slow  # ~25 s; every bitwise resume test compares two same-seed runs by default
def test_same_seed_same_losses(tmp_path: Path) -> None:
    for name in ("a", "b"):
        result = launch(*RESNET_TINY, *DDP2, "seed=3", f"run_dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 8
    other = launch(*RESNET_TINY, *DDP2, "seed=4", f"run_dir={tmp_path / 'c'}")
    assert other.returncode == 0, other.stderr
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_worker_failure_is_reported_once(tmp_path: Path) -> None:
    result = launch(*RESNET_TINY, *DDP2, "task=failing_task:TASK", f"run_dir={tmp_path / 'f'}")
    assert result.returncode == 1
    err = result.stderr
    assert err.count("ValueError: synthetic failure on rank 1") == 2, err  # traceback's end + summary line
    assert "failing_task.py" in err and "elastic/multiprocessing" not in err
    assert "error: worker rank 1 failed (exit code 1): ValueError: synthetic failure" in err
    assert "Connection closed by peer" not in err


def test_plain_progress_and_summary(tmp_path: Path) -> None:
    result = launch(*RESNET_TINY, "trainer.max_steps=4", "trainer.log_every=2", f"run_dir={tmp_path / 'p'}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "step 2/4 loss=" in out and "step 4/4 loss=" in out
    assert "trainkit run summary" in out and "eval_accuracy" in out
    assert (tmp_path / "p" / "config.yaml").read_text().count("max_steps: 4") == 1


def _failure(log_dir: Path, local_rank: int, exitcode: int, error: dict | None = None) -> ProcessFailure:
    """A worker's failure as the elastic agent records it, its error file where the agent puts it."""
    path = log_dir / "trainkit-x_abc" / "attempt_0" / str(local_rank) / "error.json"
    path.parent.mkdir(parents=True)
    if error is not None:
        path.write_text(json.dumps(error))
    return ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(path))


def test_failure_report_names_the_rank_that_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The agent saw rank 0 (which only lost its peer) exit first; rank 1's error file tells the story."""
    raised = {"message": {"message": "trainkit: no bucket b", "extraInfo": {"timestamp": "1", "exitcode": 2}}}
    _failure(tmp_path, 1, 2, raised)
    assert report_failure(ChildFailedError("worker_main", {0: _failure(tmp_path, 0, 1)}), str(tmp_path)) == (
        2, "worker rank 1 failed (exit code 2): trainkit: no bucket b")
    assert capsys.readouterr().err == ""  # no traceback for trainkit's own errors; the caller prints the line


def test_failure_report_without_error_files(tmp_path: Path) -> None:
    """A worker killed by a signal leaves no file: the agent's account, and exit code 1 for the job."""
    code, message = report_failure(ChildFailedError("worker_main", {1: _failure(tmp_path, 1, -9)}), str(tmp_path))
    assert code == 1 and "worker rank 1 failed (exit code -9): Signal 9 (SIGKILL)" in message


def test_one_exit_code_mapping_for_every_worker() -> None:
    """The local and the Ray worker both map a training outcome through exit_for."""
    from trainkit.errors import ConfigError, Preempted, StorageError, TrainkitError
    from trainkit.launch.worker import PEER_LOST, exit_for

    assert exit_for(Preempted("preempted at step 3")) == (75, "preempted at step 3")
    assert exit_for(StorageError("no bucket b")) == (2, "trainkit: no bucket b")
    assert exit_for(ConfigError("bad")) == (2, "trainkit: bad")
    assert exit_for(TrainkitError("nan loss")) == (1, "trainkit: nan loss")
    code, message = exit_for(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore"))
    assert code == 1 and message == f"{PEER_LOST} ([gloo] Connection closed by peer [127.0.0.1]:1234)"
    assert exit_for(ValueError("a bug")) is None  # keeps its traceback
    assert exit_for(KeyboardInterrupt()) is None
