"""Every shell block and Python snippet of docs/quickstart.md runs, in order, as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from launching import ROOT

DOC = ROOT / "docs" / "quickstart.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_quickstart_runs_as_written() -> None:
    for name in ("quickstart", "quickstart-gpt", "quickstart-own", "quickstart-data"):
        shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    shell = _blocks("bash")
    assert len(shell) == 4
    for block in shell:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{block}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert (ROOT / "runs" / "quickstart" / "report" / "loss.png").exists()
    (snippet,) = _blocks("python")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
