"""The cluster definitions under launchers/, checked offline (no cloud, no cluster).

* Ray cluster launcher YAMLs: Ray's own schema (ray/autoscaler/ray-schema.json, what
  ``ray up`` validates against) before and after Ray's own config preparation (defaults
  merged, per-type worker bounds filled); the AWS node configs also against botocore's
  EC2 RunInstances input model (shipped with botocore), which is what Ray passes them to.
* The KubeRay RayJob: parsed and checked field by field. KubeRay's CRD schema is not
  available offline (it ships with the operator's Helm chart), so this is a structural check.
* The Slurm script: ``bash -n`` and its ``#SBATCH`` lines.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from launching import ROOT
from trainkit.launch.compose import compose_config

LAUNCHERS = ROOT / "launchers"


def _ray_config(name: str) -> dict:
    return yaml.safe_load((LAUNCHERS / name).read_text())


def _entrypoint_overrides(command: str) -> list[str]:
    """The key=value overrides of a ``python -m trainkit.launch ...`` command line."""
    words = shlex.split(command)
    start = words.index("trainkit.launch") + 1
    return [w for w in words[start:] if "=" in w and not w.startswith("-")]


def _ray_command(text: str) -> str:
    """The trainkit command in a YAML's usage comment (lines joined at the backslashes)."""
    lines = [ln.lstrip("# ").rstrip() for ln in text.splitlines() if ln.startswith("#")]
    joined = " ".join(lines).replace("\\ ", " ")
    match = re.search(r"python -m trainkit\.launch (.*?)(?:\(|$)", joined)
    assert match, "no trainkit command in the usage comment"
    return "python -m trainkit.launch " + match.group(1)


@pytest.mark.parametrize("name", ["aws-spot.yaml", "gcp-spot.yaml"])
def test_ray_cluster_yaml_passes_rays_schema_and_preparation(name):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_config(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # no training on the (on-demand) head
    workers = [t for n, t in types.items() if n != prepared["head_node_type"]]
    assert workers and all(t["max_workers"] >= 1 for t in workers)


@pytest.mark.parametrize("name", ["aws-spot.yaml", "gcp-spot.yaml"])
def test_ray_cluster_yaml_head_uses_the_spot_health_checks(name):
    """The head's GCS declares a vanished node dead as fast as the spot bench measured it."""
    from trainkit.launch.ray.session import SPOT_SYSTEM_CONFIG

    start = next(c for c in _ray_config(name)["head_start_ray_commands"] if c.startswith("ray start"))
    flags = [w for w in shlex.split(start) if w.startswith("--system-config=")]
    assert flags and json.loads(flags[0].split("=", 1)[1]) == SPOT_SYSTEM_CONFIG


def test_aws_workers_are_spot_gpus_and_node_configs_fit_run_instances():
    import botocore.session
    from botocore.validate import ParamValidator

    config = _ray_config("aws-spot.yaml")
    types = config["available_node_types"]
    worker = types["gpu_spot"]["node_config"]
    assert worker["InstanceMarketOptions"]["MarketType"] == "spot"
    assert worker["InstanceType"].startswith("g5.")
    assert "InstanceMarketOptions" not in types["head"]["node_config"]  # on-demand head
    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in types.items():
        params = {"ImageId": "ami-00000000", "MinCount": 1, "MaxCount": 1, **node_type["node_config"]}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_gcp_workers_are_spot():
    config = _ray_config("gcp-spot.yaml")
    types = config["available_node_types"]
    scheduling = types["gpu_spot"]["node_config"]["scheduling"]
    assert scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True
    assert scheduling["onHostMaintenance"] == "TERMINATE" and scheduling["automaticRestart"] is False
    assert "scheduling" not in types["head"]["node_config"]


@pytest.mark.parametrize("name", ["aws-spot.yaml", "gcp-spot.yaml"])
def test_ray_cluster_yaml_usage_command_composes(name):
    overrides = _entrypoint_overrides(_ray_command((LAUNCHERS / name).read_text()))
    cfg = compose_config(overrides)
    assert cfg.launcher.name == "ray" and cfg.launcher.address == "auto"
    assert cfg.run_dir.startswith(("s3://", "gs://"))


def test_kuberay_rayjob_manifest():
    docs = list(yaml.safe_load_all((LAUNCHERS / "kuberay-rayjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["template"]["spec"]["containers"] for g in groups)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1
        assert g["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    # The entrypoint is a trainkit command that composes and targets the existing cluster.
    overrides = _entrypoint_overrides(spec["entrypoint"])
    cfg = compose_config(overrides)
    assert cfg.launcher.name == "ray" and cfg.launcher.address == "auto"
    assert cfg.launcher.workers <= sum(g["maxReplicas"] for g in groups)


def _sbatch_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            opt = line.split(None, 1)[1]
            key, _, value = opt.partition("=")
            out[key] = value
    return out


def test_slurm_script_syntax_and_directives():
    path = LAUNCHERS / "slurm.sbatch"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    opts = _sbatch_lines(text)
    assert opts["--ntasks-per-node"] == "1"
    assert "--requeue" in opts
    assert re.fullmatch(r"(B:)?(TERM|USR1)@\d+", opts["--signal"])
    # Every directive sits before the first command (sbatch stops reading at the first one).
    first_cmd = next(i for i, ln in enumerate(text.splitlines())
                     if ln.strip() and not ln.startswith("#"))
    last_directive = max(i for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH"))
    assert last_directive < first_cmd
    assert "scontrol requeue" in text and re.search(r'"\$CODE" -eq 75', text)
    assert "launcher=local" in text and "-m trainkit.launch" in text


def test_slurm_script_requeues_on_exit_75(tmp_path):
    """Runs the script with fake srun/scontrol: exit 75 requeues, other codes pass through."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$LOG"\nexit "$FAKE_CODE"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1" = show ]; then echo node-a; echo node-b; else echo "scontrol $*" >> "$LOG"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    for code, want_rc, requeued in ((75, 0, True), (0, 0, False), (1, 1, False)):
        log = tmp_path / f"log{code}"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(log), "FAKE_CODE": str(code),
               "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_GPUS_ON_NODE": "8"}
        proc = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), "recipe=gpt", "strategy=fsdp"],
                              capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == want_rc, proc.stdout + proc.stderr
        calls = log.read_text()
        assert "launcher.nodes=2 launcher.workers=8 recipe=gpt strategy=fsdp" in calls
        assert ("scontrol requeue 42" in calls) == requeued
