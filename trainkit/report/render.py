"""From run dirs to the summary table, ``report.json`` and the PNGs."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from trainkit import rundir, storage
from trainkit.cost.goodput import BUCKETS, LABELS, covered_steps, final_metrics, goodput, mean_samples_per_s
from trainkit.cost.prices import CostConfig, Price, bill
from trainkit.errors import ConfigError
from trainkit.options import build
from trainkit.report import plots
from trainkit.report.load import RunLog, load_run, run_name

SINGLE_FIGURES = ("loss.png", "throughput.png", "step_time.png", "timeline.png", "badput.png")


def default_out(run_dirs: list[str]) -> str:
    """``RUN_DIR/report`` for one local run; ``./report-<name>`` for a remote one; ``./report-compare``."""
    if len(run_dirs) == 1:
        url = run_dirs[0]
        return rundir.path(url, rundir.REPORT) if storage.is_local(url) else f"report-{run_name(url)}"
    return "report-compare"


def _price(log: RunLog) -> Price | None:
    """The run's price from its config.yaml's ``cost`` section (None: no price, or a section
    this trainkit cannot read, which is said once)."""
    section = log.config.get("cost") if isinstance(log.config, dict) else None
    if not section:
        return None
    try:
        return build(CostConfig, section, "cost").price()
    except ConfigError as exc:
        warnings.warn(f"{log.url}: no cost: {exc}", stacklevel=2)
        return None


def summarize(log: RunLog) -> dict[str, Any]:
    """The numbers of the summary table (goodput's dict plus loss, throughput and, when the
    run's config names a price, ``cost_usd`` and ``cost``: :func:`trainkit.cost.bill`)."""
    result = goodput(log.metrics, log.events)
    final = final_metrics(log.metrics)
    starts = {s["attempt"]: s["start_step"] for s in result["spans"] if s["start_step"] is not None}
    losses = [r["loss"] for r in final if isinstance(r.get("loss"), (int, float))]
    out = {
        "name": log.name,
        "run_dir": log.url,
        **result,
        "final_loss": losses[-1] if losses else None,
        "mean_samples_per_s": mean_samples_per_s(final, result["useful_s"], covered_steps(final, starts)),
    }
    price = _price(log)
    if price is not None:
        out["cost"] = bill(result, price)
        out["cost_usd"] = out["cost"]["usd"]
    return out


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min ({seconds:.0f} s)"
    return f"{seconds:.1f} s"


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    sign = "-" if value < 0 else ""
    return f"{sign}${abs(value):,.2f}" if abs(value) >= 10 else f"{sign}${abs(value):.4f}"


def format_table(s: dict[str, Any]) -> str:
    status = "finished" if s["finished"] else (s["spans"][-1]["status"] if s["spans"] else "no attempts")
    rows = [
        ("run", s["run_dir"]),
        ("steps", f"{s['steps']} ({status})"),
        ("attempts", str(s["attempts"])),
        ("preemptions", str(s["preemptions"])),
        ("crashes", str(s["crashes"])),
        ("checkpoints", f"{s['checkpoints']} ({s['checkpoint_blocking_s']:.1f} s blocking)"),
        ("recomputed steps", str(s["recomputed_steps"])),
        ("wall time", _fmt_s(s["wall_s"])),
        ("useful step time", _fmt_s(s["useful_s"])),
        ("goodput", _fmt(s["goodput"], ".1%")),
        ("steady-state goodput", f"{_fmt(s['steady_goodput'], '.1%')} (the useful steps at the median step time)"),
        ("final loss", _fmt(s["final_loss"], ".4g")),
        ("mean samples/s", _fmt(s["mean_samples_per_s"], ".1f")),
    ]
    wall = s["wall_s"] or 0.0
    share = (lambda x: f"{x / wall:6.1%}") if wall > 0 else (lambda x: "     -")
    rows.append(("where the wall time went", ""))
    for key in ("useful", *BUCKETS):
        seconds = s["useful_s"] if key == "useful" else s["badput_s"][key]
        if key == "membership" and not seconds:  # only ft.mode=replicas runs have it
            continue
        rows.append((f"  {LABELS[key]}", f"{share(seconds)}  {_fmt_s(seconds)}"))
    rows.append(("  lost to interruptions", f"{share(s['interruption_s'])}  {_fmt_s(s['interruption_s'])} "
                                            "(restarts' start-up and restore, recompute, emergency saves, downtime)"))
    cost = s.get("cost")
    if cost:
        rows += [
            ("cost", f"{_usd(cost['usd'])} ({cost['capacity']}, {_usd(cost['usd_per_hour'])}/h per {cost['per']}, "
                     f"{cost['unit_hours']:.3g} {cost['per']}-hours)"),
            ("  per 1,000 useful steps", _usd(cost["usd_per_1k_steps"])),
            ("  lost to interruptions", _usd(cost["lost_to_preemption_usd"])),
            ("  saving vs on-demand", f"{_usd(cost['saving_vs_on_demand_usd'])} (the same useful work, "
                                      "uninterrupted, at the on-demand price)"),
            ("  price source", cost["price_source"]),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def format_compare(summaries: list[dict[str, Any]]) -> str:
    priced = any("cost_usd" in s for s in summaries)
    header = ("run", "final loss", "steps", "goodput", *(("cost_usd",) if priced else ()))
    body = [(s["name"], _fmt(s["final_loss"], ".4g"), str(s["steps"]), _fmt(s["goodput"], ".1%"),
             *((_usd(s.get("cost_usd")),) if priced else ())) for s in summaries]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write(out: str, name: str, data: bytes) -> str:
    url = storage.join(out, name)
    fs, path = storage.filesystem(url)
    if storage.is_local(out):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    storage.retry(lambda: fs.pipe_file(path, data), what=url)
    return url


def _json_default(value: Any) -> Any:
    return None if value != value else str(value)  # NaN → null


def report_run(run_dir: str, out: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Writes the five PNGs and ``report.json`` for one run; returns its summary and the files."""
    log = load_run(run_dir)
    summary = summarize(log)
    out = out or default_out([run_dir])
    spans = summary["spans"]
    figures = {
        "loss.png": plots.loss_figure(log.metrics, spans, title=f"{log.name}: loss and learning rate"),
        "throughput.png": plots.throughput_figure(log.metrics, spans,
                                                  title=f"{log.name}: throughput (gray: between attempts)"),
        "step_time.png": plots.step_time_figure(log.metrics, spans, title=f"{log.name}: where the step time goes"),
        "timeline.png": plots.timeline_figure(log.events, summary),
        "badput.png": plots.badput_figure(summary),
    }
    written = [_write(out, name, plots.to_png(fig)) for name, fig in figures.items()]
    written.append(_write(out, "report.json", json.dumps(summary, indent=2, default=_json_default).encode()))
    return summary, written


def report_runs(run_dirs: list[str], out: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Overlays the loss curves of several runs; writes ``loss.png`` and ``report.json``."""
    logs = [load_run(url) for url in run_dirs]
    names = [log.name for log in logs]
    if len(set(names)) < len(names):  # same basename in different places: use the full URL
        for log in logs:
            log.name = log.url
    summaries = [summarize(log) for log in logs]
    out = out or default_out(run_dirs)
    fig = plots.compare_loss_figure([(log.name, log.metrics) for log in logs])
    written = [_write(out, "loss.png", plots.to_png(fig))]
    slim = [{k: v for k, v in s.items() if k != "spans"} for s in summaries]
    written.append(_write(out, "report.json", json.dumps(slim, indent=2, default=_json_default).encode()))
    return summaries, written
