"""The shared bench report: tables that read as text and as markdown, and what a section names."""

from __future__ import annotations

import subprocess
import sys

from trainkit.bench import report


def test_table_pads_and_aligns():
    text = report.table(["what", "s"], [["save", "0.5"], ["load", None]])
    lines = text.splitlines()
    assert lines[0] == "| what |   s |"
    assert lines[1] == "|------|----:|"
    assert lines[3] == "| load |   - |"
    assert len({len(line) for line in lines}) == 1


def test_commits_name_a_change_during_the_run():
    assert report.commits("abc", "abc") == "abc"
    assert report.commits("abc", "def") == "abc at start, def at end"


def test_section_names_machine_commit_load_and_raw_figures(tmp_path):
    info = report.machine()
    assert info["cpu_count"] >= 1 and info["torch"]
    text = report.section("python -m trainkit.bench x --n 1", info, ["**t**\n\n" + report.table(["a"], [[1]])],
                          {"figure": 1.5}, wall_s=2.0, load_end=[0.1, 0.2, 0.3], commit_end="later")
    assert text.startswith("## `python -m trainkit.bench x --n 1`")
    assert f"{info['cpu_count']} CPUs" in text and "later at end" in text and "[0.1, 0.2, 0.3]" in text
    assert '"figure": 1.5' in text and "wall time: 2.0s" in text
    out = tmp_path / "results.md"
    report.append(out, text, "X benchmarks")
    report.append(out, text, "X benchmarks")
    assert out.read_text().count("# X benchmarks") == 1 and out.read_text().count("## `python") == 2


def test_bench_cli_lists_every_bench():
    proc = subprocess.run([sys.executable, "-m", "trainkit.bench"], capture_output=True, text=True)
    assert proc.returncode == 2 and "step|data|checkpoint|memory|node-loss|spot|scale" in proc.stderr
