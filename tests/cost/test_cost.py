"""Badput buckets and the bill on a hand-made event log whose answer is worked out by hand,
and the cost options' checks."""

from __future__ import annotations

import pytest

from trainkit.config import load_config
from trainkit.cost import BUCKETS, CostConfig, Price, bill, goodput, price_table
from trainkit.errors import ConfigError

T = 1000.0


def rec(step, t, attempt, block=0.0):
    return {"step": step, "time": T + t, "attempt": attempt, "step_time_s": 1.0, "data_wait_s": 0.1,
            "checkpoint_block_s": block}


def ev(kind, t, **fields):
    return {"event": kind, "time": T + t, **fields}


@pytest.fixture
def run():
    """1 s steps, 0.1 s of each waiting for data. Attempt 0 (2 nodes) is made at 0, starts at 5,
    logs steps 1..10 at 6..15 (step 6 blocked 0.3 s on the save of step 5), checkpoints step 8
    and is killed after its record of step 10. Attempt 1 (1 node) is made at 25, loads step 8
    in 1.5 s, starts at 28, logs 9..14 and is preempted at step 14 (saved by 35). Attempt 2
    (2 nodes) is made at 40, loads in 1 s, starts at 42, logs 15..20, saves step 20 blocking
    for 0.4 s and finishes at 48.6."""
    a0 = [rec(s, 5 + s, 0, 0.3 if s == 6 else 0.0) for s in range(1, 11)]
    metrics = a0[:8] + [rec(s, 20 + s, 1) for s in range(9, 15)] + [rec(s, 28 + s, 2) for s in range(15, 21)]
    events = [
        ev("start", 5, attempt=0, step=0, world_size=4, strategy="ddp", startup_s=5.0, nodes=2),
        ev("checkpoint", 13, step=8, blocking_s=0.0, blocking=False),
        ev("restore", 27, step=8, recomputed_steps=2, load_s=1.5, dropped_until=T + 15),
        ev("start", 28, attempt=1, step=8, world_size=2, strategy="ddp", startup_s=3.0, nodes=1),
        ev("checkpoint", 34.9, step=14, blocking_s=0.8, blocking=True),
        ev("preempted", 35, step=14, reason="SIGTERM"),
        ev("restore", 41.5, step=14, recomputed_steps=0, load_s=1.0, dropped_until=None),
        ev("start", 42, attempt=2, step=14, world_size=4, strategy="ddp", startup_s=2.0, nodes=2),
        ev("checkpoint", 48.4, step=20, blocking_s=0.4, blocking=True),
        ev("finish", 48.6, step=20),
    ]
    return metrics, events


def test_badput_buckets_add_up_to_the_wall_time(run):
    g = goodput(*run)
    assert g["wall_s"] == pytest.approx(48.6)
    assert g["useful_s"] == pytest.approx(20 * 0.9 - 0.3)
    assert list(g["badput_s"]) == list(BUCKETS)
    assert g["badput_s"] == pytest.approx({
        "startup": 5 + 1.5 + 1.0, "restore": 2.5, "checkpoint_save": 0.3 + 0.4, "data_wait": 2.0,
        "recompute": 2.0,  # the killed attempt's records of steps 9 and 10, dropped on restore
        "emergency_save": 1.0, "downtime": 10 + 5, "membership": 0.0, "other": 0.2,  # after the final save
    })
    assert g["useful_s"] + sum(g["badput_s"].values()) == pytest.approx(g["wall_s"])
    # Interruptions: the kill (recompute 2 + downtime 10), the preemption (save 1 + downtime 5),
    # and the start-up and restore of the two attempts they caused (3 + 2).
    assert g["interruption_s"] == pytest.approx(23.0)
    assert g["steady_goodput"] == pytest.approx(20 / 48.6) and g["useful_steps"] == 20
    crashed, preempted, finished = g["spans"]
    assert (crashed["status"], crashed["end"], crashed["end_step"]) == ("crashed", T + 15, 10)
    assert preempted["began"] == T + 25 and finished["began"] == T + 40
    assert crashed["interruption_s"] == pytest.approx(12) and finished["interruption_s"] == pytest.approx(2)


def test_bill_charges_each_attempt_at_its_size(run):
    g = goodput(*run)
    price = Price(spot=True, on_demand_usd_per_hour=3.0, spot_usd_per_hour=1.0, per="node", source="test")
    c = bill(g, price)
    # node-seconds: attempt 0 from 0 to 25 on 2 nodes, 1 from 25 to 40 on 1, 2 from 40 to 48.6 on 2.
    unit_s = 25 * 2 + 15 * 1 + 8.6 * 2
    lost = 12 * 2 + 9 * 1 + 2 * 2
    assert c["usd"] == pytest.approx(unit_s / 3600)
    assert c["usd_per_1k_steps"] == pytest.approx(unit_s / 3600 / 20 * 1000)
    assert c["lost_to_preemption_usd"] == pytest.approx(lost / 3600)
    assert c["saving_vs_on_demand_usd"] == pytest.approx((unit_s - lost) * 3 / 3600 - unit_s / 3600)
    assert (c["capacity"], c["per"], c["price_source"]) == ("spot", "node", "test")
    per_worker = bill(g, Price(spot=False, on_demand_usd_per_hour=0.5, spot_usd_per_hour=None, per="worker",
                               source="test"))
    assert per_worker["usd"] == pytest.approx((25 * 4 + 15 * 2 + 8.6 * 4) * 0.5 / 3600)
    assert per_worker["saving_vs_on_demand_usd"] == pytest.approx(-per_worker["lost_to_preemption_usd"])


def test_the_price_table_ships_dated_with_sources():
    table = price_table()
    assert table["compiled"] and "list prices" in table["about"]
    for name, entry in table["instances"].items():
        assert ":" in name and entry["source"].startswith("https://") and entry["as_of"], name
        assert entry["on_demand"] > 0 and (entry["spot"] is None or 0 < entry["spot"] < entry["on_demand"])


def test_cost_options_from_the_table_and_from_the_user():
    name, entry = next((n, e) for n, e in price_table()["instances"].items() if e["spot"] and e["gpus"] > 1)
    p = load_config({"cost": {"instance": name, "spot": True, "per": "worker"}}).cost.price()
    assert p.usd_per_hour == pytest.approx(entry["spot"] / entry["gpus"])
    assert p.on_demand_usd_per_hour == pytest.approx(entry["on_demand"] / entry["gpus"]) and name in p.source
    own = load_config({"cost": {"spot": True, "spot_usd_per_hour": 0.7, "on_demand_usd_per_hour": 2.0}}).cost.price()
    assert (own.usd_per_hour, own.on_demand_usd_per_hour, own.per) == (0.7, 2.0, "node")
    assert CostConfig().price() is None  # no price: the run reports no cost


@pytest.mark.parametrize("cost, message", [
    ({"instance": "aws:p9.huge"}, "cost.instance='aws:p9.huge' is not in trainkit's price table; valid: aws:"),
    ({"spot": True}, "cost.spot=true needs a price"),
    ({"spot": False, "spot_usd_per_hour": 1.0}, "an on-demand run needs cost.on_demand_usd_per_hour"),
    ({"on_demand_usd_per_hour": -1.0}, "cost.on_demand_usd_per_hour=-1.0 must be >= 0"),
    ({"per": "gpu"}, "cost.per='gpu' is not valid; valid: worker, node"),
])
def test_bad_cost_options_are_one_line_errors(cost, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")):
        load_config({"cost": cost})


def test_spot_without_a_spot_price_in_the_table():
    name = next(n for n, e in price_table()["instances"].items() if e["spot"] is None)
    with pytest.raises(ConfigError, match="no spot price for"):
        load_config({"cost": {"instance": name, "spot": True}})


def test_the_closing_summary_prints_nested_figures_one_a_line():
    from trainkit.metrics.progress import format_summary

    text = format_summary({"steps": 40, "cost_usd": 0.0381, "badput_s": {"startup": 20.6, "downtime": 53.0},
                           "cost": {"usd": 0.0381, "capacity": "spot"}})
    lines = [line.split() for line in text.splitlines()]
    assert ["badput_s.startup", "20.6"] in lines and ["badput_s.downtime", "53"] in lines
    assert ["cost.capacity", "spot"] in lines and ["cost_usd", "0.0381"] in lines
