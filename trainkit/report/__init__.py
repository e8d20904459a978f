"""Run reports: what a run (or a sweep) did, where its time went, and its goodput.

    python -m trainkit.report RUN_DIR [RUN_DIR ...] [--out DIR]

See docs/report.md. :func:`goodput` is the pure computation; :func:`report_run` and
:func:`report_runs` read run dirs (local or fsspec URLs) and write the PNGs.
"""

from trainkit.report.goodput import attempt_spans, final_metrics, goodput
from trainkit.report.load import RunLog, load_run
from trainkit.report.render import default_out, report_run, report_runs, summarize

__all__ = ["RunLog", "attempt_spans", "default_out", "final_metrics", "goodput", "load_run",
           "report_run", "report_runs", "summarize"]
