"""Where a figure was measured: the machine, the commit, the load, and the tables a bench prints.

A figure only compares with one taken on the same machine and commit under a similar load,
so every bench records these the same way and appends the same kind of dated markdown
section to its file under docs/benchmarks/.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def git_commit(short: bool = False) -> str | None:
    """The checkout's HEAD, marked when tracked files differ from it; None outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return f"{commit} (with uncommitted changes)" if dirty else commit


def commits(start: str | None, end: str | None) -> str:
    """One commit, or both when the tree changed while the bench ran (a job's later workers
    import trainkit from the tree as it is then, so the change is named, not hidden)."""
    return f"{start}" if start == end else f"{start} at start, {end} at end"


def load_avg() -> list[float] | None:
    """The 1/5/15-minute load average (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(packages: Sequence[str] = ("torch",)) -> dict[str, Any]:
    """The machine, the versions of ``packages``, the load and the commit, right now."""
    return {
        "platform": platform.platform(), "node": platform.node(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "ram_gib": _ram_gib(),
        **{name: _version(name) for name in packages},
        "load_avg": load_avg(), "git_commit": git_commit(),
    }


def describe(info: dict[str, Any], packages: Sequence[str] = ("torch",)) -> str:
    """:func:`machine`'s answer as one line."""
    versions = "".join(f", {name} {info.get(name)}" for name in packages)
    return (f"{info['platform']}, {info['cpu_count']} CPUs, {info['ram_gib']} GiB RAM, "
            f"Python {info['python']}{versions}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A markdown table, padded so it also reads as text; ``align`` has one ``l`` or ``r`` per
    column (default: the first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def section(command: str, info: dict[str, Any], body: Sequence[str], raw: dict[str, Any], *,
            packages: Sequence[str] = ("torch",), date: str | None = None, wall_s: float | None = None,
            load_end: list[float] | None = None, commit_end: str | None = None) -> str:
    """A dated markdown section: the command, where it ran (``info`` from :func:`machine` at
    the start), ``body`` (tables, text), and the raw figures as JSON."""
    commit = commits(info.get("git_commit"), commit_end if commit_end is not None else info.get("git_commit"))
    out = [
        f"## `{command}`", "",
        f"- date: {date or now()}",
        f"- machine: {describe(info, packages)}",
        f"- git commit: `{commit}`",
        f"- load average at start (1/5/15 min): {info.get('load_avg')}; at end: {load_end}",
    ]
    if wall_s is not None:
        out.append(f"- wall time: {wall_s:.1f}s")
    out.append("")
    for part in body:
        out += [part, ""]
    out += ["<details><summary>raw figures (JSON)</summary>", "", "```json",
            json.dumps(raw, indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(out)


def append(path: str | os.PathLike[str], text: str, title: str) -> None:
    """Appends a section to a results file, starting it with ``# title`` when it is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write(f"# {title}\n\n")
        f.write(text)
