"""The SkyPilot managed-job YAMLs under launchers/, checked offline.

SkyPilot's own loader (``sky.Task.from_yaml``: its JSON schema, then its Resources and
job-recovery parsing) runs in the tool environment ``scripts/setup.sh`` builds in
``.tools/skypilot`` (SkyPilot pins click<8.2, which the training environment cannot share).
The ``run`` block is then executed for real as two "nodes" on loopback, with the
``SKYPILOT_*`` variables SkyPilot sets, so the rendezvous wiring is what trains.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launching import RESNET_TINY, ROOT, launch_here, losses
from trainkit.distributed import free_port

SKY_PYTHON = ROOT / ".tools" / "skypilot" / "bin" / "python"
CLOUDS = {"aws": "s3://", "gcp": "gs://"}

LOAD = """
import json, sys
import sky
task = sky.Task.from_yaml(sys.argv[1])
(res,) = task.resources
print(json.dumps({"nodes": task.num_nodes, "spot": res.use_spot, "cloud": str(res.cloud).lower(),
                  "recovery": res.job_recovery, "envs": task.envs, "run": task.run}))
"""


def _sky(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    if not SKY_PYTHON.exists():
        pytest.fail(f"{SKY_PYTHON} is missing: ./scripts/setup.sh builds the SkyPilot tool environment")
    env = {**os.environ, "HOME": str(tmp_path)}  # SkyPilot writes ~/.sky; keep it out of the real home
    return subprocess.run([str(SKY_PYTHON), "-c", LOAD, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module", params=sorted(CLOUDS))
def job(request, tmp_path_factory) -> tuple[str, dict]:
    cloud = request.param
    result = _sky(ROOT / "launchers" / f"skypilot-{cloud}-spot.yaml", tmp_path_factory.mktemp("sky"))
    assert result.returncode == 0, result.stderr
    return cloud, json.loads(result.stdout.strip().splitlines()[-1])


def test_skypilot_loads_each_managed_job_as_spot_with_recovery_on_exit_75(job) -> None:
    cloud, task = job
    assert task["cloud"] == cloud and task["spot"] is True
    assert task["recovery"]["strategy"] == "EAGER_NEXT_REGION"
    # 75 is "preempted, resumable": recovered without spending a crash restart.
    assert task["recovery"]["recover_on_exit_codes"] == [75]
    assert task["recovery"]["max_restarts_on_errors"] >= 1
    assert task["envs"]["RUN_DIR"].startswith(CLOUDS[cloud])
    assert "python -m trainkit.launch" in task["run"]


def test_skypilot_refuses_a_broken_copy(tmp_path: Path) -> None:
    """The loader really validates: a wrong type in resources is refused by SkyPilot itself."""
    text = (ROOT / "launchers" / "skypilot-aws-spot.yaml").read_text().replace("use_spot: true", "use_spot: maybe")
    (tmp_path / "bad.yaml").write_text(text)
    result = _sky(tmp_path / "bad.yaml", tmp_path)
    assert result.returncode != 0
    assert "use_spot" in result.stderr


def test_trainkit_accepts_the_run_blocks_command(job) -> None:
    """The command the run block execs, with SkyPilot's variables filled in, is a valid trainkit config."""
    cloud, task = job
    env = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "8", **task["envs"]}
    command = task["run"].split("exec ", 1)[1].replace("\\\n", " ")
    for name in sorted(env, key=len, reverse=True):
        command = command.replace(f"${name}", env[name])
    words = shlex.split(command)
    overrides = words[words.index("trainkit.launch") + 1:]
    shown = launch_here("--cfg", "job", *overrides)
    assert shown.returncode == 0, shown.stderr
    shown = yaml.safe_load(shown.stdout)
    assert shown["launcher"]["nodes"] == 2 and shown["launcher"]["workers"] == 8
    assert shown["run_dir"] == task["envs"]["RUN_DIR"] and shown["strategy"]["name"] == "fsdp"
    # The run block turns on this cloud's notice poller (only the YAML names the real address).
    key = f"preemption.{cloud}_endpoint="
    (given,) = [o[len(key):] for o in overrides if o.startswith(key)]
    assert given.startswith("http://") and shown["preemption"][f"{cloud}_endpoint"] == given


@pytest.mark.slow  # 15-35 s; the two-launcher rendezvous itself is in tests/train/test_multinode.py by default
def test_run_block_trains_on_two_loopback_nodes(tmp_path: Path) -> None:
    """The run block as SkyPilot runs it on each node: both launchers meet at the first node's IP."""
    task = yaml.safe_load((ROOT / "launchers" / "skypilot-aws-spot.yaml").read_text())
    run = tmp_path / "run"
    args = [*RESNET_TINY, "strategy=ddp", "trainer.max_steps=6", "preemption.aws_endpoint=''"]
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "TRAINKIT_STORE": str(ROOT / ".cache" / "test-store"), "MASTER_PORT": str(free_port()),
            "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1", "SKYPILOT_NUM_NODES": "2",
            "SKYPILOT_NUM_GPUS_PER_NODE": "1", "SKYPILOT_TASK_ID": "sky-test",
            "RUN_DIR": str(run), "TRAINKIT_ARGS": " ".join(args)}
    procs = [subprocess.Popen(["bash", "-euc", task["run"]], env={**base, "SKYPILOT_NODE_RANK": str(rank)},
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(losses(run)) == 6
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
