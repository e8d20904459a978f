"""What a run records about itself: metrics and events in ``run_dir``, progress on rank 0.

Reading them back is :mod:`trainkit.rundir`'s job (``read_metrics``, ``read_events``).
"""

from trainkit.metrics.jsonl import JsonlLog
from trainkit.metrics.progress import Progress, format_summary

__all__ = ["JsonlLog", "Progress", "format_summary"]
