"""The GPU check's measurements and its report; ``scripts/gpu-check.sh`` runs it.

A GPU is lent now and then, for minutes: everything runs from one command, inside a time
budget, and each figure comes with the exact command that produced it. A step that fails or
runs out of time is written down as such and the rest still runs, so one broken part does not
cost the others' figures. ``--dry-run`` runs every step that can run on a CPU, tiny, and
writes the same report: that is how the report's format is tested without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainkit import rundir  # noqa: E402
from trainkit.bench import report  # noqa: E402

# The GPU run's models: big enough to keep an H100/H200 busy.
# resnet: the ImageNet ResNet-34 layout ([3,4,6,3] basic blocks, width 64) on 56 px inputs,
# which with trainkit's CIFAR-style stem (3x3, stride 1, no max-pool) gives the feature maps
# ImageNet's ResNet-34 has at 224 px after its stem.
GPU_RESNET = ["model.width=64", "model.blocks=[3,4,6,3]", "model.image_size=56", "data.batch_size=256",
              "trainer.max_steps=80", "trainer.log_every=10"]
# gpt: GPT-2 small's shape (12 layers, 12 heads, d_model 768, context 1024) on byte tokens.
GPU_GPT = ["model.n_layer=12", "model.n_head=12", "model.d_model=768", "model.seq_len=1024",
           "data.batch_size=32", "trainer.max_steps=60", "trainer.log_every=10"]
TINY_RESNET = ["model.width=4", "model.blocks=[1]", "model.image_size=8", "data.batch_size=16",
               "trainer.max_steps=6", "trainer.log_every=2"]
TINY_GPT = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
            "model.corpus_bytes=200000", "data.batch_size=8", "trainer.max_steps=6", "trainer.log_every=2"]
COMMON = ["trainer.precision=bf16", "trainer.progress=plain", "trainer.loggers=[]", "launcher.workers=1"]

SECTIONS = ("Machine", "Throughput (bf16)", "Checkpoint from GPU memory", "Sync-debug test",
            "Step overhead vs a hand-written loop", "Goals", "Commands", "Raw figures")


class Check:
    """Runs the steps within a deadline and keeps what each produced."""

    def __init__(self, dry_run: bool, budget_s: float, work: Path) -> None:
        self.dry_run = dry_run
        self.deadline = time.monotonic() + budget_s
        self.work = work
        self.commands: list[dict[str, Any]] = []
        self.env = dict(os.environ, TRAINKIT_STORE=str(work / "store"), PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))

    def run(self, name: str, argv: list[str], cap_s: float) -> dict[str, Any]:
        left = self.deadline - time.monotonic()
        entry: dict[str, Any] = {"name": name, "command": shlex.join(argv), "rc": None, "wall_s": 0.0}
        self.commands.append(entry)
        if left < 10:
            entry["status"] = "not run: out of time"
            return entry
        t0 = time.monotonic()
        # A session of its own: on a timeout the launcher's workers go too, and free the GPU
        # for the next step.
        p = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=min(cap_s, left))
            entry.update(rc=p.returncode, stdout=out, stderr=err,
                         status="ok" if p.returncode == 0 else f"failed (exit {p.returncode}): {_last(err or out)}")
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            entry.update(status=f"timed out after {min(cap_s, left):.0f}s", stdout=out, stderr=err)
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        return entry


def _last(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def machine_facts() -> dict[str, Any]:
    import torch

    info = report.machine()
    facts: dict[str, Any] = {"machine": report.describe(info), "commit": info["git_commit"], "torch": torch.__version__,
                             "cuda": torch.version.cuda, "gpu": None, "driver": None, "info": info}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    try:
        facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def _median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def throughput(check: Check, recipe: str, strategy: str, compile_: bool) -> dict[str, Any]:
    """One recipe run; figures are medians over the records after the first (warm-up, compile)."""
    name = f"{recipe} {strategy} compile={'on' if compile_ else 'off'}"
    row: dict[str, Any] = {"run": name, "recipe": recipe, "strategy": strategy, "compile": compile_}
    if compile_ and check.dry_run:
        row["status"] = "not run: dry run (torch.compile on a CPU takes minutes)"
        return row
    model = {"resnet": TINY_RESNET if check.dry_run else GPU_RESNET, "gpt": TINY_GPT if check.dry_run else GPU_GPT}[recipe]
    run_dir = check.work / "runs" / name.replace(" ", "_").replace("=", "-")
    argv = [sys.executable, "-m", "trainkit.launch", f"recipe={recipe}", f"strategy={strategy}", *model, *COMMON,
            f"trainer.compile={str(compile_).lower()}", "checkpoint.enabled=false", f"run_dir={run_dir}"]
    entry = check.run(name, argv, 150)
    row["status"] = entry["status"]
    records = [r for r in rundir.read_metrics(str(run_dir)) if "samples_per_s" in r]
    steady = records[1:] or records
    row.update(records=len(records), samples_per_s=_median(steady, "samples_per_s"),
               tokens_per_s=_median(steady, "tokens_per_s"), mfu=_median(steady, "mfu"),
               step_ms=None if _median(steady, "step_time_s") is None else _median(steady, "step_time_s") * 1e3)
    return row


def checkpoint(check: Check) -> dict[str, Any]:
    """The gpt run with async saves every 10 steps: the time each save blocked the loop,
    start of save to commit, and the bytes written."""
    model = TINY_GPT if check.dry_run else GPU_GPT
    every = 2 if check.dry_run else 10
    run_dir = check.work / "runs" / "gpt_checkpoint"
    argv = [sys.executable, "-m", "trainkit.launch", "recipe=gpt", "strategy=single", *model, *COMMON,
            "checkpoint.enabled=true", f"checkpoint.every_steps={every}", "checkpoint.keep_last=10",
            "checkpoint.export_safetensors=false", f"run_dir={run_dir}"]
    entry = check.run("checkpoint (gpt, async, overlap_staging)", argv, 150)
    out: dict[str, Any] = {"status": entry["status"]}
    events = rundir.read_events(str(run_dir))
    commits = {e["step"]: e for e in rundir.of(events, rundir.CHECKPOINT_COMMITTED)}
    saves = []
    for e in rundir.of(events, rundir.CHECKPOINT):
        done = commits.get(e["step"])
        size = _dir_bytes(run_dir / rundir.CHECKPOINTS / rundir.step_dir(e["step"]))
        saves.append({"step": e["step"], "blocking": e["blocking"], "blocking_s": e["blocking_s"], "bytes": size,
                      "save_s": None if done is None else done["time"] - e["time"]})
    metrics = rundir.read_metrics(str(run_dir))
    out["saves"] = saves
    last = max((r["step"] for r in metrics), default=0)
    in_loop = [s for s in saves if not s["blocking"] and s["step"] <= last]
    # With overlap_staging the optimizer step waits for the host copy: that wait is blocked
    # time too. The metrics' checkpoint_block_s holds both, per step.
    total = sum(r.get("checkpoint_block_s", 0.0) * _steps(r, metrics) for r in metrics)
    out["staged_wait_s"] = max(0.0, total - sum(s["blocking_s"] for s in in_loop))
    steady = [s for s in in_loop[1:] if s["save_s"]]
    if steady:
        wait = out["staged_wait_s"] / max(1, len(in_loop))
        out["blocking_s"] = statistics.median(s["blocking_s"] for s in steady) + wait
        out["save_s"] = statistics.median(s["save_s"] for s in steady)
        out["mb"] = statistics.median(s["bytes"] for s in steady) / 1e6
        out["mb_per_s"] = out["mb"] / out["save_s"]
        out["blocking_pct"] = 100 * out["blocking_s"] / out["save_s"]
    if saves:
        out["first_blocking_s"] = saves[0]["blocking_s"]
    return out


def _steps(record: dict[str, Any], metrics: list[dict[str, Any]]) -> int:
    """Optimizer steps a metrics record averages over (its timers are per step)."""
    before = [r["step"] for r in metrics if r["step"] < record["step"]]
    return record["step"] - (max(before) if before else 0)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def sync_debug(check: Check) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu/test_sync_debug.py"]
    entry = check.run("sync-debug test", argv, 180)
    summary = _last(entry.get("stdout", ""))
    passed = entry["rc"] == 0 and "passed" in summary
    skipped = entry["rc"] == 0 and "skipped" in summary and "passed" not in summary
    return {"status": entry["status"], "summary": summary,
            "result": "passed" if passed else "skipped (no CUDA)" if skipped else "FAILED"}


def step_overhead(check: Check, strategy: str) -> dict[str, Any]:
    size = ["--blocks", "3", "--block", "5", "--width", "32", "--depth", "2"] if check.dry_run else \
        ["--blocks", "60"]
    argv = [sys.executable, "-m", "trainkit.bench", "step", "--strategy", strategy, "--workers", "1", *size]
    entry = check.run(f"step overhead ({strategy})", argv, 120)
    out: dict[str, Any] = {"strategy": strategy, "status": entry["status"]}
    for line in entry.get("stdout", "").splitlines():
        if line.startswith('{"bench": "step"'):
            raw = json.loads(line)
            out.update({k: raw[k] for k in ("ratio", "quartiles", "total_ratio", "plain_ms", "trainkit_ms", "device", "backend")})
    return out


def _quartiles(q: list[float] | None) -> str:
    return "-" if not q else f"{q[0]:.3f}-{q[1]:.3f}"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(date: str, facts: dict[str, Any], results: dict[str, Any], commands: list[dict[str, Any]],
           dry_run: bool, wall_s: float) -> str:
    title = "GPU check" + (" (dry run on CPU: tiny models, GPU-only steps not run)" if dry_run else "")
    out = [f"# {title}, {date}", "", "Written by `scripts/gpu-check.sh`" + (" --dry-run" if dry_run else "") +
           f" in {wall_s:.0f}s. Figures are medians after the first logging window (warm-up, compilation).", ""]
    out += ["## Machine", "",
            f"- machine: {facts['machine']}",
            f"- GPU: {facts['gpu'] or 'none'}; driver: {facts['driver'] or '-'}",
            f"- torch {facts['torch']} (CUDA {facts['cuda'] or '-'})",
            f"- git commit: `{facts['commit']}`", ""]
    rows = [[r["run"], _fmt(r.get("samples_per_s"), ".1f"), _fmt(r.get("tokens_per_s"), ".0f"),
             _fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f"), _fmt(r.get("step_ms"), ".2f"), r["status"]]
            for r in results["throughput"]]
    out += ["## Throughput (bf16)", "",
            "resnet: " + " ".join(TINY_RESNET if dry_run else GPU_RESNET) + "; gpt: " +
            " ".join(TINY_GPT if dry_run else GPU_GPT) + ". samples/s is img/s for resnet.", "",
            report.table(["run", "samples/s", "tokens/s", "MFU %", "step ms", "status"], rows, "lrrrrl"), ""]
    c = results["checkpoint"]
    out += ["## Checkpoint from GPU memory", "",
            "The gpt run above with `checkpoint.every_steps` (async, `overlap_staging`); the first save "
            "(staging buffers allocated) and the final blocking save are left out of the medians. Blocked time is "
            "`save()` plus the optimizer step's wait for the host copy (spread over the saves); a save's time runs "
            "from `save()` to the step boundary at which its commit was seen.", "",
            report.table(["saves", "state MB", "blocked s", "save s", "save MB/s", "blocked % of save", "first save blocked s",
                          "status"],
                         [[len(c.get("saves", [])), _fmt(c.get("mb"), ".0f"), _fmt(c.get("blocking_s"), ".4f"),
                           _fmt(c.get("save_s"), ".2f"), _fmt(c.get("mb_per_s"), ".0f"), _fmt(c.get("blocking_pct"), ".2f"),
                           _fmt(c.get("first_blocking_s"), ".3f"), c["status"]]], "rrrrrrrl"), ""]
    s = results["sync_debug"]
    out += ["## Sync-debug test", "",
            "`tests/gpu/test_sync_debug.py`: the recipes' non-logging steps under "
            "`torch.cuda.set_sync_debug_mode(\"error\")`.", "",
            f"- result: **{s['result']}** ({s['summary'] or s['status']})", ""]
    rows = [[o["strategy"], f"{o.get('device', '-')} / {o.get('backend', '-')}", _fmt(o.get("plain_ms"), ".3f"),
             _fmt(o.get("trainkit_ms"), ".3f"), _fmt(o.get("ratio"), ".4f"), _quartiles(o.get("quartiles")), o["status"]]
            for o in results["step_overhead"]]
    out += ["## Step overhead vs a hand-written loop", "",
            "`python -m trainkit.bench step --workers 1` (one rank: NCCL on the GPU): trainkit's loop vs a "
            "hand-written DDP / FSDP2 loop on the same MLP and batches, taking turns every 10 steps; the "
            "ratio is the median over pairs of neighbouring blocks.", "",
            report.table(["strategy", "device / backend", "hand-written ms", "trainkit ms", "ratio", "quartiles",
                          "status"], rows, "llrrrrl"), ""]
    rows = goals(results)
    if dry_run:  # tiny CPU figures say nothing about the goals
        rows = [[*r[:3], "(dry run)"] for r in rows]
    out += ["## Goals", "", report.table(["goal", "target", "measured", "met"], rows, "llll"), ""]
    out += ["## Commands", "", "Run from the repository root, in this order (`TRAINKIT_STORE` pointed at a temporary "
            "directory):", ""]
    for e in commands:
        out += [f"- {e['name']} ({e['wall_s']}s, {e.get('status')}):", "", f"      {e['command']}", ""]
    raw = {"facts": {k: v for k, v in facts.items() if k != "info"}, "machine": facts["info"], **results}
    out += ["## Raw figures", "", "```json", json.dumps(raw, indent=1, default=str), "```", ""]
    return "\n".join(out)


def goals(results: dict[str, Any]) -> list[list[str]]:
    by_run = {r["run"]: r for r in results["throughput"]}

    def met(value: float | None, ok: bool) -> str:
        return "-" if value is None else ("yes" if ok else "no")

    resnet = by_run.get("resnet single compile=on", {}).get("samples_per_s") or \
        by_run.get("resnet single compile=off", {}).get("samples_per_s")
    mfu = by_run.get("gpt single compile=on", {}).get("mfu")
    block = results["checkpoint"].get("blocking_pct")
    ratios = [o.get("ratio") for o in results["step_overhead"] if o.get("ratio") is not None]
    return [
        ["resnet bf16 img/s (ResNet-50 at 224 px goal; here ResNet-34 layout, see above)", ">= 3000",
         _fmt(resnet, ".0f"), met(resnet, (resnet or 0) >= 3000)],
        ["GPT-2-small-size gpt MFU, bf16, torch.compile", ">= 40 %", _fmt(None if mfu is None else 100 * mfu, ".1f"),
         met(mfu, (mfu or 0) >= 0.40)],
        ["checkpoint blocking, % of the save", "<= 2 %", _fmt(block, ".2f"), met(block, (block or 100) <= 2)],
        ["step overhead vs hand-written loop", "<= 1.02x", ", ".join(f"{r:.4f}" for r in ratios) or "-",
         "-" if not ratios else ("yes" if max(ratios) <= 1.02 else "no")],
        ["no host sync on non-logging steps", "sync-debug test passes", results["sync_debug"]["result"],
         "yes" if results["sync_debug"]["result"] == "passed" else "-" if "skipped" in results["sync_debug"]["result"] else "no"],
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU versions of the steps that run without a GPU")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "benchmarks"))
    p.add_argument("--budget-s", type=float, default=330.0, help="time for all the measurements")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    date = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(args.dry_run, args.budget_s, Path(tmp))
        facts = machine_facts()
        results: dict[str, Any] = {"dry_run": args.dry_run}
        # Cheapest and most telling first, so a short lease still leaves figures behind.
        results["sync_debug"] = sync_debug(check)
        results["step_overhead"] = [step_overhead(check, s) for s in ("ddp", "fsdp")]
        results["throughput"] = [throughput(check, "gpt", "single", False), throughput(check, "gpt", "single", True),
                                 throughput(check, "resnet", "single", False), throughput(check, "gpt", "fsdp", False)]
        results["checkpoint"] = checkpoint(check)
        results["throughput"].append(throughput(check, "resnet", "single", True))
        text = render(date, facts, results, check.commands, args.dry_run, time.monotonic() - t0)
    out = Path(args.out_dir) / f"gpu-check-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"gpu-check: wrote {out}")
    failed = [e["name"] for e in check.commands if e.get("status") != "ok" and not str(e.get("status")).startswith("not run")]
    if failed:
        print(f"gpu-check: failed or timed out: {', '.join(failed)} (see the report)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
