"""The documentation site builds with every page and API entry resolving (mkdocs --strict)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launching import ROOT


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "trainkit.Run" in api and "Stream" in api and "PreemptionWatcher" in api
