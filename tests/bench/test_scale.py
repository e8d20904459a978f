"""The growth the scale bench measures, pinned on the library's own code with fabricated
inputs (no processes): sizes, counts and memory, not times (speed lives in the bench)."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np

from trainkit.bench import scale
from trainkit.report.spot_model import Scenario, expected, job_mtbf_s, simulate, young_daly


def _positions_peak(world: int) -> tuple[int, int]:
    """(tracemalloc peak, ids returned) of the last rank's micro-batch at a planned window."""
    from trainkit.data.loader import _MicroBatches

    order = scale._order(10**9, 100_000, 8)
    mb = _MicroBatches(None, seed=0, start=order.num_samples // 3, rank=world - 1, world_size=world, micro=4,
                       num_workers=0, transform=None, collate=None)
    order.positions(0, *mb.batch_positions(0))
    tracemalloc.start()
    ids = order.positions(0, *mb.batch_positions(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, len(ids)


def test_a_ranks_positions_at_4096_ranks_cost_what_they_cost_at_2():
    small, n_small = _positions_peak(2)
    big, n_big = _positions_peak(4096)
    assert n_small == n_big == 4
    assert big <= 2 * small


def test_the_prefetch_schedule_is_recomputed_more_often_as_the_global_batch_grows():
    # documents today's cost (a request to the data owner): the schedule is O(shards) and
    # a rank recomputes it whenever it enters a new window, so its share of steps grows with world
    shares = [scale.data_step(10**8, 10_000, w, steps=200)["schedule_share"] for w in (2, 256, 4096)]
    assert shares[0] < shares[1] < shares[2]


def test_manifest_bytes_grow_linearly_in_ranks_with_two_collectives_per_commit():
    runs = {w: scale.checkpoint_commit(w) for w in (64, 256, 1024)}
    per_rank = [runs[w]["manifest_bytes"] / w for w in runs]
    assert max(per_rank) / min(per_rank) < 1.05
    for r in runs.values():
        assert r["collectives"] == {"gather_object": 1, "broadcast_object": 1}
    # rank 0 receives every rank's records once (linear); any other rank only the outcome
    got = [runs[w]["bytes_in_rank0"]["gather_object"] / w for w in runs]
    assert max(got) / min(got) < 1.1
    others = {sum(runs[w]["bytes_in_other_rank"].values()) for w in runs}
    assert len(others) == 1 and others.pop() < 100


def test_restore_discovery_costs_the_same_after_1000_saves_as_after_10():
    many = scale.discovery_history(saves=1000, world=4)
    few = scale.discovery_history(saves=10, world=4)
    assert many["retained"] == few["retained"] == 2 and many["loaded"] == 100_000
    # GET latest, LIST the root, HEAD + GET its manifest, LIST its step dir (the size check)
    assert many["discovery_requests"] == few["discovery_requests"] == {"GET": 2, "LIST": 2, "HEAD": 1}
    # with keep_every the retained steps grow with the history; discovery through latest does not
    kept = scale.discovery_history(saves=300, world=4, keep_every=1000)
    assert kept["retained"] == 31 and kept["loaded"] == 30_000
    assert kept["discovery_requests"] == many["discovery_requests"]
    assert kept["listing_requests"]["LIST"] == 3 + kept["retained"]  # the fallback lists every step dir


def test_a_save_lists_its_own_step_dir_only_once_retention_has_listed_the_root():
    many = scale.discovery_history(saves=1000, world=4)
    kept = scale.discovery_history(saves=300, world=4, keep_every=1000)
    # commit: LIST its step dir, PUT manifest and latest; retention: delete one step
    # (DELETE its manifest, LIST it, one DeleteObjects); no listing of the root or of the kept steps
    for run in (many, kept):
        assert run["last_save_requests"] == {"PUT": 2, "LIST": 2, "DELETE": 2}
    assert many["history_requests"]["LIST"] == 2 * 1000 + 1


def test_discovery_through_latest_lists_one_step_dir_and_the_fallback_every_retained_one():
    small, big = scale.discovery_at_world(8, 2), scale.discovery_at_world(4096, 2)
    assert small["latest_pointer"] == {"GET": 2, "LIST": 2, "HEAD": 1}
    files = 3 * 4096 + 1 + 1  # data files ×2 and rank JSON per rank, .metadata, manifest
    assert big["latest_pointer"] == {"GET": 2, "LIST": 1 + math.ceil(files / 1000), "HEAD": 1}
    assert big["listing"]["LIST"] == 2 + 3 * math.ceil(files / 1000)


def test_a_remote_log_upload_stays_under_a_part_however_long_the_run():
    whole = scale.log_uploads(600, part_bytes=1 << 62)
    rolled = scale.log_uploads(600, part_bytes=16_000)
    assert whole["last_put_bytes"] == whole["log_bytes"]  # before: the whole file each time
    assert rolled["last_put_bytes"] <= 16_000 + 1_000
    assert rolled["log_bytes"] == whole["log_bytes"]
    # bytes put: quadratic in records before, linear after
    assert whole["bytes_put"] > 10 * rolled["bytes_put"]


def test_dcp_items_and_metadata_grow_linearly_and_plan_caching_sends_empty_plans():
    a, b, c = scale.dcp_global_plan(2), scale.dcp_global_plan(4), scale.dcp_global_plan(8)
    assert [r["items"] for r in (a, b, c)] == [2 * 1164, 4 * 1164, 8 * 1164]
    step1, step2 = b["metadata_bytes"] - a["metadata_bytes"], c["metadata_bytes"] - b["metadata_bytes"]
    assert 1.8 < step2 / step1 < 2.2  # the same bytes for every rank added: linear
    assert a["cached_local_plan_bytes"] < 200 < a["local_plan_bytes"] / 1000
    params = sum(int(np.prod(shape)) for _, shape in scale.llama3_8b())
    assert 8.0e9 < params < 8.1e9


def test_spot_model_keeps_every_step_across_noticed_preemptions_and_loses_them_without_saves():
    notice_only = Scenario(nodes=8, hours=24, notice_per_node_h=0.5, emergency_save_s=0, restart_s=0,
                           save_block_s=0)
    assert simulate(notice_only)["goodput"] == 1.0
    hard = Scenario(nodes=8, hours=24, failure_per_node_h=0.05, restart_s=60, save_block_s=0.1, save_total_s=5)
    none = expected(hard)
    yd = young_daly(hard.save_block_s, job_mtbf_s(hard))
    saved = expected(Scenario(**{**hard.__dict__, "interval_s": yd}))
    assert none["goodput"] < 0.2 < 0.9 < saved["goodput"]
    assert math.isclose(yd, math.sqrt(2 * 0.1 * 3600 / 0.4))
