"""Every shell block and Python snippet of docs/quickstart.md runs, in order, as written.

The "Bring your ..." sections also show a whole diff between two files in docs/examples/ and
state its size: both must be what the files say today.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys

import pytest

from launching import ROOT

DOC = ROOT / "docs" / "quickstart.md"
EXAMPLES = ROOT / "docs" / "examples"
# Sections run by their own test (after the first five, which build on each other).
BRING = {"script": ("## 6. Bring your script", "plain_train.py", "train_script.py", "quickstart-script"),
         "accelerate": ("## 7. Bring your Accelerate loop", "accelerate_plain.py", "accelerate_loop.py",
                        "quickstart-accelerate")}


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:] if end < 0 else text[start:end]


def _blocks(kind: str, text: str | None = None) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text() if text is None else text, flags=re.S)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    return env


def _run_shell(block: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{block}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_quickstart_runs_as_written() -> None:
    for name in ("quickstart", "quickstart-gpt", "quickstart-own", "quickstart-data"):
        shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
    first = DOC.read_text().split(BRING["script"][0])[0]
    shell = _blocks("bash", first)
    assert len(shell) == 4
    for block in shell:
        _run_shell(block)
    assert (ROOT / "runs" / "quickstart" / "report" / "loss.png").exists()
    (snippet,) = _blocks("python", first)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("what", BRING)
@pytest.mark.rotate("quickstart-bring")  # tests/accelerate and tests/launch_script prove both paths every run
def test_bring_your_own_sections(what: str) -> None:
    title, before, after, run = BRING[what]
    section = _section(title)
    lines = list(difflib.unified_diff((EXAMPLES / before).read_text().splitlines(keepends=True),
                                      (EXAMPLES / after).read_text().splitlines(keepends=True),
                                      fromfile=before, tofile=after))
    (shown,) = _blocks("diff", section)
    assert shown == "".join(lines), f"the diff in {title!r} is not the files' diff any more"
    added = sum(1 for x in lines[2:] if x.startswith("+"))
    removed = sum(1 for x in lines[2:] if x.startswith("-"))
    assert f"**{added} lines added, {removed} removed**" in section.replace("\n", " ")
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    (block,) = _blocks("bash", section)
    assert _run_shell(block).stdout.strip().splitlines()[-1] == "1"  # the relaunch restored once
