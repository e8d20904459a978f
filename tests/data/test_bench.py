"""The data benchmark runs end to end (tiny sizes; the figures themselves are not checked)."""

from trainkit.bench import data as bench


def test_bench_data_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    summary = bench.run(["--samples", "96", "--sample-bytes", "2048", "--shard-bytes", "32768",
                         "--batch-size", "16", "--latency", "0.005", "--json", str(out)])
    assert out.exists()
    assert set(summary["ratios"]) == {"trainkit_vs_raw", "trainkit_vs_webdataset"}
    assert all(r["samples_per_s"] > 0 for r in summary["results"].values())
    text = capsys.readouterr().out
    assert "trainkit / raw fsspec" in text and "mosaicml-streaming" in text
