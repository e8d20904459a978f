"""What a run costs: in time (goodput, and badput in named buckets) and in dollars.

:mod:`trainkit.cost.goodput` accounts for a run's wall time from its ``events.jsonl`` and
``metrics.jsonl``; :mod:`trainkit.cost.prices` holds the ``cost.*`` options, the dated price
table and :func:`bill`. ``Run.finish`` writes both into summary.json; ``python -m
trainkit.report`` and ``python -m trainkit.bench spot`` use the same functions.
"""

from trainkit.cost.goodput import BUCKETS, goodput
from trainkit.cost.prices import CostConfig, Price, bill, price_table

__all__ = ["BUCKETS", "CostConfig", "Price", "bill", "goodput", "price_table"]
