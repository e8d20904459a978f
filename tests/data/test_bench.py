"""The data benchmark runs end to end (tiny sizes; the figures themselves are not checked,
the content of every batch is, by each reader)."""

from trainkit.bench import data as bench


def test_bench_data_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    summary = bench.run(["--cases", "small", "--samples", "300", "--shard-bytes", "200000", "--batch-size", "32",
                         "--workers", "0,1", "--latency", "0.005", "--rounds", "1",
                         "--readers", "parquet,arrow,webdataset", "--json", str(out)])
    assert out.exists()
    case = summary["cases"]["small"]
    assert set(case["ratios"]) == {f"{w} workers: {o}" for w in (0, 1) for o in (
        "trainkit/raw", "trainkit/best of webdataset, mosaic", "trainkit on Parquet/trainkit",
        "trainkit on Arrow/trainkit")}
    assert all(len(v) == 1 for v in case["ratios_per_round"].values())  # one per round
    assert len(case["results"]) == 9 and all(r["samples_per_s"] > 0 for r in case["results"].values())
    assert not case["failed"]
    text = capsys.readouterr().out
    assert "trainkit/raw" in text and "not measured: mosaic" in text
