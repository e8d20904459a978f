"""The core packages stand without the benches: importing them loads no test server, fault
proxy or WebDataset (only ``trainkit.bench`` and the tests use those)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import trainkit

BENCH_ONLY = ("trainkit.testing", "trainkit.bench", "webdataset")


@pytest.mark.parametrize("package", ["trainkit.checkpoint", "trainkit.data", "trainkit"])
def test_core_package_imports_no_bench_dependencies(package):
    code = f"import json, sys, {package}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert [m for m in loaded if m.split(".")[0] in BENCH_ONLY or m.startswith(BENCH_ONLY)] == []


def test_core_sources_name_no_bench_dependency():
    """Also the imports inside functions, which only run when called."""
    root = Path(trainkit.__file__).parent
    found = []
    for package in ("checkpoint", "data"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith(BENCH_ONLY)]
    assert found == []
