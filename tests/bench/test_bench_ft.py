"""``python -m trainkit.bench ft`` end to end at its smallest: five real launches on loopback, the
figures read back from their ledgers and metrics (no timing thresholds: those are the bench's)."""

from __future__ import annotations

import pytest

from trainkit.bench import ft


@pytest.mark.slow
def test_bench_ft_measures_every_figure(tmp_path):
    out = tmp_path / "ft.md"
    raw = ft.run(["--steps", "150", "--notice-step", "40", "--kill-step", "5", "--out", str(out)])
    for point in ("kill_allreduce", "kill_commit"):
        k = raw[point]
        assert k["survivor_participants"] == 1
        # The supervisor respawns within /proc's 10 ms start-time tick: this one may read just below 0.
        assert k["kill_to_replacement_process_s"] == k["kill_to_replacement_process_s"]  # not NaN
        for key in ("kill_to_survivor_commit_s", "replacement_start_to_commit_s",
                    "replacement_python_startup_s", "replacement_manager_quorum_heal_s", "replacement_first_step_s"):
            assert k[key] is not None and k[key] > 0, (point, key, k)
    n = raw["notice"]
    assert n["notice_to_survivor_alone_commit_s"] > 0 and n["left_to_survivor_alone_commit_s"] > 0
    assert n["window_steps"] > 0
    assert raw["steady_replicas"]["median_step_s"] > 0 and raw["steady_ddp"]["median_step_s"] > 0
    assert raw["overhead_ratio"] > 0
    text = out.read_text()
    for field in ("git commit", "load average", "kill → survivor's next commit", "replacement start → its first commit",
                  "notice → survivor's first commit without it", "restart mode, ddp, 2 workers"):
        assert field in text
