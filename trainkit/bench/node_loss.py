"""Time from a lost Ray node to the first resumed training step (``launcher=ray``).

    python -m trainkit.bench node-loss [key=value ...]      # prints seconds, JSON last

Starts a loopback Ray
cluster (a 0-CPU head + one 1-CPU node per worker), launches the recipe with
``launcher=ray`` in a subprocess, removes a node hosting a worker right after the first
committed checkpoint, adds a replacement, and reads the run's own records:

* ``detect_s``   node removed -> the restarted attempt's ``start`` event (Ray noticed the
  loss, tore the group down, placed and started a new one, restored the checkpoint);
* ``resume_s``   node removed -> the first metrics record of the new attempt (first
  resumed optimizer step logged), the headline figure;
* ``lost_steps`` steps recomputed (the restore event's ``recomputed_steps``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainkit import rundir
from trainkit.bench import report
from trainkit.bench.loopback import LoopbackCluster

DEFAULT = [
    "recipe=resnet", "model.width=4", "model.blocks=[1,1]", "model.image_size=8", "data.batch_size=32",
    "strategy=ddp", "launcher.workers=2", "trainer.threads=1", "trainer.log_every=1",
    "trainer.progress=plain", "checkpoint.every_steps=10", "trainer.max_steps=200",
]


def node_loss_recovery(overrides: list[str] = (), workers: int = 2, timeout: float = 600) -> dict[str, Any]:
    info = report.machine(("torch", "ray"))
    cluster = LoopbackCluster(workers)
    run_dir = Path(tempfile.mkdtemp(prefix="trainkit-bench-nodeloss-")) / "run"
    try:
        cmd = [sys.executable, "-m", "trainkit.launch", *DEFAULT, f"launcher.workers={workers}", *overrides,
               "launcher=ray", f"launcher.address={cluster.address}", f"run_dir={run_dir}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while not rundir.of(rundir.read_events(str(run_dir)), rundir.CHECKPOINT_COMMITTED):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"no checkpoint before the launcher ended ({proc.poll()})")
            time.sleep(0.05)
        nodes: list[Any] = []
        while not nodes and time.time() < deadline:
            nodes = cluster.train_nodes()
        t_lost = time.time()
        cluster.remove(nodes[0], graceful=False)
        cluster.add()
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        events = rundir.read_events(str(run_dir))
        metrics = rundir.read_metrics(str(run_dir))
        starts = [e for e in rundir.of(events, rundir.START) if e["time"] > t_lost]
        restores = [e for e in rundir.of(events, rundir.RESTORE) if e["time"] > t_lost]
        attempt = starts[0]["attempt"] if starts else None
        resumed = [m for m in metrics if m.get("attempt") == attempt and m["time"] > t_lost]
        return {
            "exit_code": rc,
            "detect_s": starts[0]["time"] - t_lost if starts else None,
            "resume_s": min(m["time"] for m in resumed) - t_lost if resumed else None,
            "lost_steps": restores[0]["recomputed_steps"] if restores else None,
            "restored_step": restores[0]["step"] if restores else None,
            "workers": workers,
            "run_dir": str(run_dir),
            "machine": info,
            "load_avg_end": report.load_avg(),
        }
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> None:
    result = node_loss_recovery(sys.argv[1:] if argv is None else argv)
    print(f"node loss -> group restarted: {result['detect_s']:.1f} s" if result["detect_s"] is not None else
          "node loss -> group restarted: n/a")
    print(f"node loss -> first resumed step: {result['resume_s']:.1f} s" if result["resume_s"] is not None else
          "node loss -> first resumed step: n/a")
    print(f"steps recomputed: {result['lost_steps']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
