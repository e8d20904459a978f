"""What a run records about itself: metrics and events in ``run_dir``, progress on rank 0."""

from trainkit.metrics.jsonl import JsonlLog, read_jsonl
from trainkit.metrics.progress import Progress, format_summary

__all__ = ["JsonlLog", "Progress", "format_summary", "read_jsonl"]
