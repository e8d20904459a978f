"""The report's figures: matplotlib's Agg canvas, no pyplot state, a fixed pixel size.

Every figure is ``FIGSIZE`` inches at ``DPI`` (8 × 4.5 in at 100 dpi = 800 × 450 px) and saved
without tight cropping, so the PNG size never depends on the data.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainkit import rundir
from trainkit.cost.goodput import LABELS, covered_steps, final_metrics

FIGSIZE = (8.0, 4.5)
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height)

STATUS_COLORS = {"finished": "tab:green", "preempted": "tab:orange", "crashed": "tab:red",
                 "incomplete": "tab:gray"}


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "h"
    if seconds >= 180:
        return 60.0, "min"
    return 1.0, "s"


def _num(rows: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else None for r in rows]


def _resume_steps(spans: Sequence[dict[str, Any]]) -> list[int]:
    return [s["start_step"] for s in spans[1:] if s.get("start_step") is not None]


def loss_figure(metrics: list[dict[str, Any]], spans: Sequence[dict[str, Any]] = (), title: str = "") -> Figure:
    """Loss (left axis) and learning rate (right axis) against step; resumes as dashed lines."""
    fig, ax = _figure()
    rows = [r for r in final_metrics(metrics) if isinstance(r.get("loss"), (int, float))]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    for i, step in enumerate(_resume_steps(spans)):
        ax.axvline(step, color="gray", ls="--", lw=0.8, label="resumed from checkpoint" if i == 0 else None)
    lr_rows = [r for r in final_metrics(metrics) if isinstance(r.get("lr"), (int, float))]
    handles, labels = ax.get_legend_handles_labels()
    if lr_rows:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], color="tab:purple", lw=1.0,
                 label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:purple")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize="small")
    ax.set_title(title or "loss and learning rate")
    ax.grid(alpha=0.3)
    return fig


def throughput_figure(metrics: list[dict[str, Any]], spans: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """samples/s against wall-clock time since the first start, one colour per attempt."""
    fig, ax = _figure()
    rows = [r for r in final_metrics(metrics)
            if isinstance(r.get("samples_per_s"), (int, float)) and isinstance(r.get("time"), (int, float))]
    t0 = min([s["start"] for s in spans] + [r["time"] for r in rows], default=0.0)
    span_s = max([r["time"] - t0 for r in rows] + [s["end"] - t0 for s in spans] + [1.0])
    scale, unit = _time_unit(span_s)
    by_attempt: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by_attempt.setdefault(r.get("attempt", 0), []).append(r)
    for attempt, group in by_attempt.items():
        ax.plot([(r["time"] - t0) / scale for r in group], [r["samples_per_s"] for r in group],
                marker=".", label=f"attempt {attempt}")
    for s in spans[:-1]:
        nxt = spans[spans.index(s) + 1]
        ax.axvspan((s["end"] - t0) / scale, (nxt["start"] - t0) / scale, color="lightgray", alpha=0.5, lw=0)
    ax.set_xlabel(f"wall-clock time since first start ({unit})")
    ax.set_ylabel("samples / s")
    ax.set_ylim(bottom=0)
    if by_attempt:
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "throughput (gray: between attempts)")
    ax.grid(alpha=0.3)
    return fig


def step_time_figure(metrics: list[dict[str, Any]], spans: Sequence[dict[str, Any]] = (), title: str = "") -> Figure:
    """Seconds per step, stacked: compute, data wait, checkpoint blocking, against step."""
    fig, ax = _figure()
    rows = [r for r in final_metrics(metrics) if isinstance(r.get("step_time_s"), (int, float))]
    start_steps = {s["attempt"]: s["start_step"] for s in spans if s.get("start_step") is not None}
    covered = covered_steps(rows, start_steps)
    # Each record is the mean over (step - covered, step]: draw it as a flat segment there.
    xs: list[float] = []
    parts: dict[str, list[float]] = {"compute_s": [], "data_wait_s": [], "checkpoint_block_s": []}
    for r, n in zip(rows, covered):
        data = float(r.get("data_wait_s") or 0.0)
        block = float(r.get("checkpoint_block_s") or 0.0)
        compute = r.get("compute_s")
        compute = float(compute) if isinstance(compute, (int, float)) else float(r["step_time_s"]) - data - block
        for x in (r["step"] - max(n, 1), r["step"]):
            xs.append(x)
            parts["compute_s"].append(max(0.0, compute))
            parts["data_wait_s"].append(max(0.0, data))
            parts["checkpoint_block_s"].append(max(0.0, block))
    labels = {"compute_s": "compute", "data_wait_s": "data wait", "checkpoint_block_s": "checkpoint blocking"}
    colors = {"compute_s": "tab:blue", "data_wait_s": "tab:orange", "checkpoint_block_s": "tab:red"}
    if xs:
        ax.stackplot(xs, *parts.values(), labels=[labels[k] for k in parts],
                     colors=[colors[k] for k in parts], alpha=0.85)
        ax.legend(loc="upper right", fontsize="small")
    for step in _resume_steps(spans):
        ax.axvline(step, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds per step")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "where the step time goes")
    ax.grid(alpha=0.3)
    return fig


def timeline_figure(events: list[dict[str, Any]], result: dict[str, Any], title: str = "") -> Figure:
    """Attempts as bars on a wall-clock axis; checkpoints, preemptions and crashes marked."""
    fig, ax = _figure()
    spans = result["spans"]
    t0 = min((s["start"] for s in spans), default=0.0)
    scale, unit = _time_unit(max([s["end"] - t0 for s in spans] + [1.0]))
    for i, s in enumerate(spans):
        ax.barh(i, (s["end"] - s["start"]) / scale, left=(s["start"] - t0) / scale, height=0.5,
                color=STATUS_COLORS.get(s["status"], "tab:gray"), alpha=0.6, edgecolor="black", lw=0.5)
        ax.text((s["start"] - t0) / scale, i + 0.32, f"steps {s['start_step']}→{s['end_step']} ({s['status']})",
                fontsize="x-small", va="bottom")
    marked: set[str] = set()

    def mark(x: float, y: float, style: dict[str, Any], label: str) -> None:
        ax.plot([x], [y], linestyle="none", label=None if label in marked else label, **style)
        marked.add(label)

    def row_of(t: float) -> int:
        idx = 0
        for i, s in enumerate(spans):
            if s["start"] <= t:
                idx = i
        return idx

    for e in events:
        t = e.get("time")
        if not isinstance(t, (int, float)) or not spans:
            continue
        x, y = (t - t0) / scale, row_of(t)
        if e.get("event") == rundir.CHECKPOINT.name:
            mark(x, y, {"marker": "|", "color": "black", "markersize": 14}, "checkpoint")
        elif e.get("event") == rundir.PREEMPTED.name:
            mark(x, y, {"marker": "v", "color": "darkorange", "markersize": 10, "markeredgecolor": "black"},
                 "preempted")
        elif e.get("event") == rundir.RESTORE.name:
            mark(x, y + 1 if y + 1 < len(spans) and spans[y + 1]["start"] >= t else y,
                 {"marker": ">", "color": "tab:blue", "markersize": 7}, "restore")
    for i, s in enumerate(spans):
        if s["status"] == "crashed":
            mark((s["end"] - t0) / scale, i, {"marker": "X", "color": "red", "markersize": 11,
                                              "markeredgecolor": "black"}, "crash (last sign of life)")
        elif s["status"] == "finished":
            mark((s["end"] - t0) / scale, i, {"marker": "*", "color": "green", "markersize": 12}, "finished")
    ax.set_yticks(range(len(spans)), [f"attempt {s['attempt']}" for s in spans])
    ax.set_ylim(-0.6, max(len(spans), 1) - 0.4 + 0.3)
    ax.invert_yaxis()
    ax.set_xlabel(f"wall-clock time since first start ({unit})")
    g = result.get("goodput")
    head = f"goodput {g:.1%}" if g is not None else "goodput n/a"
    ax.set_title(title or f"{head}: {result['useful_s']:.0f} s useful of {result['wall_s']:.0f} s wall, "
                          f"{result['attempts']} attempt(s)")
    if marked:
        fig.legend(loc="outside lower center", fontsize="x-small", ncols=len(marked))
    ax.grid(axis="x", alpha=0.3)
    return fig


BUCKET_COLORS = {"useful": "tab:green", "startup": "tab:purple", "restore": "tab:blue", "checkpoint_save": "tab:red",
                 "data_wait": "tab:orange", "recompute": "tab:brown", "emergency_save": "gold",
                 "downtime": "tab:gray", "membership": "tab:pink", "other": "lightgray"}


# The order of an attempt's time: start-up and restore, its steps (useful, waiting for data,
# blocked on saves: interleaved, drawn as their totals), then how it ended, then the wait.
TIMELINE_ORDER = ("startup", "restore", "useful", "data_wait", "checkpoint_save", "membership", "recompute",
                  "emergency_save", "downtime", "other")


def badput_figure(result: dict[str, Any], title: str = "") -> Figure:
    """Where the wall time went, stacked: the whole run on the top row, then each attempt on a
    wall-clock axis from its beginning (start-up, restore, its steps, its recompute or
    emergency save, then the downtime until the next attempt began)."""
    fig, ax = _figure()
    spans = [s for s in result["spans"] if s.get("badput_s")]
    t0 = min((s["began"] for s in spans), default=0.0)
    rows = [("run", 0.0, {"useful": result["useful_s"], **result["badput_s"]})]
    rows += [(f"attempt {s['attempt']} ({s['status']})", s["began"] - t0,
              {"useful": s.get("useful_s", 0.0), **s["badput_s"]}) for s in spans]
    scale, unit = _time_unit(max(result["wall_s"], 1.0))
    for y, (_, start, parts) in enumerate(rows):
        left = start / scale
        for key in TIMELINE_ORDER:
            width = max(0.0, float(parts.get(key) or 0.0)) / scale
            if width <= 0:
                continue
            ax.barh(y, width, left=left, height=0.6, color=BUCKET_COLORS[key], edgecolor="black", lw=0.3,
                    label=LABELS[key] if y == 0 else None)
            left += width
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel(f"wall-clock time since the first attempt began ({unit})")
    g = result.get("goodput")
    head = f"goodput {g:.1%}" if g is not None else "goodput n/a"
    cost = result.get("cost")
    if cost:
        head += f", ${cost['usd']:.2f} on {cost['capacity']}"
    ax.set_title(title or f"where the wall time went ({head})")
    fig.legend(loc="outside lower center", fontsize="x-small", ncols=5)
    ax.grid(axis="x", alpha=0.3)
    return fig


def compare_loss_figure(runs: Sequence[tuple[str, list[dict[str, Any]]]], title: str = "") -> Figure:
    """Loss against step for several runs, overlaid (a sweep)."""
    fig, ax = _figure()
    for name, metrics in runs:
        rows = [r for r in final_metrics(metrics) if isinstance(r.get("loss"), (int, float))]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or f"loss, {len(runs)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right", ncols=1 + len(runs) // 12)
    return fig
