"""What the run's capacity costs an hour, and what the run therefore cost.

The price is the user's (``cost.spot_usd_per_hour`` / ``cost.on_demand_usd_per_hour``, per
worker or per node) or an instance's from ``prices.json``, a small table shipped in the
package that names its sources and dates (list prices at that date; nothing is fetched at run
time). :func:`bill` turns :func:`trainkit.cost.goodput.goodput`'s accounting into dollars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from trainkit.errors import ConfigError
from trainkit.options import positive

if TYPE_CHECKING:
    from trainkit.config import Config

PRICES_FILE = "prices.json"


@cache
def price_table() -> dict[str, Any]:
    """The shipped table: ``compiled`` (its date), ``about``, and ``instances`` by name."""
    return json.loads(resources.files("trainkit.cost").joinpath(PRICES_FILE).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Price:
    """USD an hour for one ``per`` (a worker or a node) on each kind of capacity."""

    spot: bool
    on_demand_usd_per_hour: float | None
    spot_usd_per_hour: float | None
    per: str
    source: str

    @property
    def usd_per_hour(self) -> float:
        rate = self.spot_usd_per_hour if self.spot else self.on_demand_usd_per_hour
        assert rate is not None  # CostConfig.check refuses a run without the price it runs at
        return rate


@dataclass
class CostConfig:
    # A name in the shipped price table (trainkit/cost/prices.json), e.g. aws:g5.xlarge; empty:
    # only the prices below. A table price is an instance's: per=node counts one an instance,
    # per=worker a GPU's share of it.
    instance: str = ""
    # The run is on spot/preemptible capacity, billed at the spot price.
    spot: bool = False
    # USD an hour for one worker or node (``per``); 0 takes the instance's from the table.
    spot_usd_per_hour: float = 0.0
    on_demand_usd_per_hour: float = 0.0
    per: Literal["worker", "node"] = "node"

    def check(self, cfg: Config) -> None:
        positive("cost.spot_usd_per_hour", self.spot_usd_per_hour, allow_zero=True)
        positive("cost.on_demand_usd_per_hour", self.on_demand_usd_per_hour, allow_zero=True)
        instances = price_table()["instances"]
        if self.instance and self.instance not in instances:
            raise ConfigError(f"cost.instance={self.instance!r} is not in trainkit's price table; valid: "
                              f"{', '.join(sorted(instances))} (or set cost.*_usd_per_hour)")
        price = self.price()
        if price is None:
            if self.spot:
                raise ConfigError("cost.spot=true needs a price: cost.spot_usd_per_hour or cost.instance")
            return
        if self.spot and price.spot_usd_per_hour is None:
            raise ConfigError(f"cost.spot=true: the price table has no spot price for {self.instance}; "
                              "set cost.spot_usd_per_hour")
        if not self.spot and price.on_demand_usd_per_hour is None:
            raise ConfigError("cost: an on-demand run needs cost.on_demand_usd_per_hour or cost.instance")

    def price(self) -> Price | None:
        """The run's prices, or None when it has none (no instance, no price set)."""
        entry = price_table()["instances"].get(self.instance) if self.instance else None
        share = 1.0
        if entry is not None and self.per == "worker":
            share = 1.0 / max(1, int(entry.get("gpus") or 1))

        def pick(own: float, key: str) -> float | None:
            if own > 0:
                return own
            table = entry.get(key) if entry is not None else None
            return float(table) * share if isinstance(table, (int, float)) else None

        on_demand = pick(self.on_demand_usd_per_hour, "on_demand")
        spot = pick(self.spot_usd_per_hour, "spot")
        if on_demand is None and spot is None:
            return None
        own = self.on_demand_usd_per_hour > 0 or self.spot_usd_per_hour > 0
        if entry is None:
            source = "cost.*_usd_per_hour (user)"
        else:
            source = (f"{self.instance}: {entry.get('source', '')}, as of {entry.get('as_of', '?')} "
                      f"(trainkit price table of {price_table().get('compiled', '?')})"
                      + ("; user prices override it" if own else ""))
        return Price(spot=self.spot, on_demand_usd_per_hour=on_demand, spot_usd_per_hour=spot, per=self.per,
                     source=source)


def bill(result: dict[str, Any], price: Price) -> dict[str, Any]:
    """The run's cost from :func:`~trainkit.cost.goodput.goodput`'s ``result``.

    Each attempt is billed from its beginning to the next one's (the last: to the end of the
    wall time) at its size: its nodes for ``per=node``, its world size for ``per=worker``. The
    downtime after an attempt is billed at that attempt's size: the cluster waits for a
    replacement (an upper bound for a single machine that is simply gone). Returns ``usd``,
    ``usd_per_1k_steps`` (over the useful steps), ``lost_to_preemption_usd`` (what the
    interruptions cost: ``interruption_s`` at the size of each attempt),
    ``saving_vs_on_demand_usd`` (the same useful work on uninterrupted on-demand capacity, less
    ``usd``; None without an on-demand price), ``price_source``, ``usd_per_hour`` (one
    ``per``), ``per``, ``capacity`` and ``unit_hours``.
    """
    spans = result["spans"]
    end = (min(s["began"] for s in spans) + result["wall_s"]) if spans else 0.0
    unit_s = lost_unit_s = 0.0
    for i, span in enumerate(spans):
        key = "nodes" if price.per == "node" else "world_size"
        units = span.get(key) if isinstance(span.get(key), int) else 1
        until = spans[i + 1]["began"] if i + 1 < len(spans) else end
        unit_s += max(0.0, until - span["began"]) * units
        lost_unit_s += float(span.get("interruption_s") or 0.0) * units
    rate = price.usd_per_hour
    usd = unit_s * rate / 3600
    on_demand = price.on_demand_usd_per_hour
    steps = result.get("useful_steps") or 0
    return {
        "usd": usd,
        "usd_per_1k_steps": usd / steps * 1000 if steps else None,
        "lost_to_preemption_usd": lost_unit_s * rate / 3600,
        "saving_vs_on_demand_usd": (unit_s - lost_unit_s) * on_demand / 3600 - usd if on_demand is not None else None,
        "price_source": price.source,
        "usd_per_hour": rate,
        "per": price.per,
        "capacity": "spot" if price.spot else "on-demand",
        "unit_hours": unit_s / 3600,
    }
