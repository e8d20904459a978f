"""Rank 0's view of a run: a live bar on a terminal, plain lines in logs, a closing summary."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    def __init__(self, mode: str, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled and mode != "off"
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if self.enabled and use_bar:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.total = total
        self.step = initial

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.step)
            if record:
                self.bar.set_postfix(
                    {k: _fmt(record[k]) for k in ("loss", "samples_per_s") if k in record}, refresh=False
                )
        elif record:
            fields = " ".join(
                f"{k}={_fmt(record[k])}" for k in ("loss", "lr", "samples_per_s") if k in record
            )
            print(f"step {step}/{self.total} {fields}", flush=True)
        self.step = step

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(summary: dict[str, Any]) -> str:
    """One line a key; a nested dict (``badput_s``, ``cost``) as indented ``key.sub`` lines."""
    rows: list[tuple[str, str]] = []
    for key, value in summary.items():
        if isinstance(value, dict):
            rows += [(f"  {key}.{sub}", _fmt(v)) for sub, v in value.items()]
        else:
            rows.append((key, _fmt(value)))
    width = max((len(k) for k, _ in rows), default=0)
    lines = ["", "trainkit run summary", "-" * (width + 24)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)
