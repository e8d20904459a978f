"""``python -m trainkit.bench.memory``: peak host memory per rank of building and exporting a
sharded model, the figures issue 12 asks for (meta init, export without gathering).

It runs the gpt recipe's own loop (``trainkit.Run``: build, setup, restore, steps) on
``--workers`` local ranks with ``strategy=fsdp``, once per case, and reads each rank's peak
resident set (``VmHWM``) at two points:

* **setup**: from the process start to the end of ``Run.setup`` (the model built eagerly on
  every rank, or on ``meta`` with ``trainer.meta_init=true``);
* **export**: the peak is reset (``/proc/self/clear_refs``) after the training steps and read
  again after the end-of-run export: ``gather`` is the earlier export (the full state dict
  gathered on rank 0, then one safetensors blob built in memory and written),
  ``sharded`` is ``export_model`` (each rank writes its part, one tensor at a time).

The two cases are ``eager + gather`` (before) and ``meta + sharded`` (after). A table goes to
stdout, then one JSON line; ``--out FILE.md`` appends a markdown section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

CASES = {"before": {"meta": False, "export": "gather"}, "after": {"meta": True, "export": "sharded"}}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(spec: dict[str, Any]) -> None:
    """One rank: the recipe's loop with the measurements; its figures as one JSON line."""
    import torch

    from trainkit.checkpoint.export import export_model, export_safetensors
    from trainkit.launch.compose import compose_config
    from trainkit.run import Run
    from trainkit.tasks import TASKS
    from trainkit.tasks.base import default_url
    from trainkit.train import _to

    cfg = compose_config(spec["overrides"])
    task = TASKS.get(cfg.task, "task")
    run = Run(cfg)
    stream = run.stream(default_url(task, cfg.model))
    t0 = time.perf_counter()
    if spec["meta"]:
        with torch.device("meta"):
            model = task.build_model(task.model_config(**cfg.model))
    else:
        model = task.build_model(task.model_config(**cfg.model))
    model, opt = run.setup(model, run.optimizer())
    setup = {"setup_peak": _status()["VmHWM"], "setup_s": time.perf_counter() - t0}
    data = run.loader(stream)
    run.restore(model=model, optimizer=opt, data=data)
    for batch in run.steps(data):
        with run.autocast():
            loss, _ = task.loss(model, _to(batch, run.dist.device))
        run.backward(loss)
        run.optimizer_step(opt)
    before = _status()["VmRSS"]
    _reset_peak()
    t0 = time.perf_counter()
    url = os.path.join(cfg.run_dir, "export", "model.safetensors")
    if spec["export"] == "gather":
        export_safetensors(model, url)
    else:
        export_model(model, url)
    export = {"rss_before_export": before, "export_peak": _status()["VmHWM"], "export_s": time.perf_counter() - t0}
    params = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    run.finish()
    print("MEMORY " + json.dumps({"rank": run.dist.rank, **setup, **export, "local_params": params}), flush=True)


def _launch(case: str, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    from trainkit import distributed

    spec = {**CASES[case], "overrides": [
        "recipe=gpt", "strategy=fsdp", f"launcher.workers={args.workers}", f"model.preset={args.preset}",
        f"data.batch_size={args.workers}", f"trainer.max_steps={args.steps}", "trainer.loggers=[]",
        "trainer.progress=off", "checkpoint.enabled=false", "checkpoint.export_safetensors=false",
        f"run_dir={os.path.join(root, case)}", f"trainer.meta_init={str(CASES[case]['meta']).lower()}",
    ]}
    port = distributed.free_port()
    procs = []
    for rank in range(args.workers):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(args.workers), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(args.workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainkit.bench.memory", "--worker", json.dumps(spec)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rows = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"bench memory: a worker failed ({p.returncode}):\n{out[-3000:]}")
        rows += [json.loads(line[len("MEMORY "):]) for line in out.splitlines() if line.startswith("MEMORY ")]
    return sorted(rows, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainkit.bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preset", default="gpt2-medium")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--out", default="")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    from trainkit.launch.compose import compose_config
    from trainkit.launch.prepare import prepare_embedded
    from trainkit.tasks import TASKS
    from trainkit.tasks.gpt import GPT, GPTConfig

    cfg = compose_config(["recipe=gpt", f"model.preset={args.preset}"])
    prepare_embedded(TASKS.get("gpt", "task"), cfg.model)
    import torch

    with torch.device("meta"):
        model_bytes = sum(t.numel() * 4 for t in GPT(GPTConfig(**cfg.model)).parameters())
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for case in CASES:
            results[case] = _launch(case, args, root)
    mb = 2**20
    lines = [f"gpt preset={args.preset} (fp32 model {model_bytes / mb:.0f} MiB), strategy=fsdp, "
             f"{args.workers} workers, {args.steps} step(s)",
             "| case | rank | setup peak MiB | RSS before export MiB | export peak MiB | export extra MiB | export s |",
             "|---|---|---|---|---|---|---|"]
    for case, rows in results.items():
        label = {"before": "eager init + gather export", "after": "meta init + sharded export"}[case]
        for r in rows:
            lines.append(f"| {label} | {r['rank']} | {r['setup_peak'] / mb:.0f} | {r['rss_before_export'] / mb:.0f} | "
                         f"{r['export_peak'] / mb:.0f} | {(r['export_peak'] - r['rss_before_export']) / mb:.0f} | "
                         f"{r['export_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    record = {"bench": "memory", "preset": args.preset, "workers": args.workers, "model_bytes": model_bytes,
              "results": results}
    print(json.dumps(record))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
                    f"({os.cpu_count()} CPUs)\n\n`python -m trainkit.bench.memory --workers {args.workers} "
                    f"--preset {args.preset} --steps {args.steps}`\n\n{table}\n")


if __name__ == "__main__":
    main()
