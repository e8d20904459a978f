"""The report's accounting is :mod:`trainkit.cost.goodput` (``Run.finish`` writes the same
figures into summary.json, and ``run`` sits below ``report`` in the layers); imported here
under the name the report's readers have always used."""

from trainkit.cost.goodput import (
    BUCKETS,
    attempt_spans,
    attempts,
    covered_steps,
    final_metrics,
    goodput,
    mean_samples_per_s,
)

__all__ = ["BUCKETS", "attempt_spans", "attempts", "covered_steps", "final_metrics", "goodput",
           "mean_samples_per_s"]
