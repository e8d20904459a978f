"""The package's layers (docs/architecture.md): no module imports one from a higher layer,
and the module-level imports between trainkit's modules have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "trainkit"

# The first dotted prefix that matches names a module's layer; lower numbers are lower.
LAYERS = {
    0: ["errors", "registry", "components", "options", "redact", "storage", "rundir", "_compat"],
    1: ["distributed", "optim", "strategies", "checkpoint", "data", "preemption", "metrics", "tasks", "cost"],
    2: ["config"],
    3: ["run", "train", "ft"],
    4: ["launch", "report", "chaos", "bench", "testing", "recipes", "__init__", "__main__"],
}


def layer(module: str) -> int:
    """The layer of ``trainkit.<module>`` (``module`` without the ``trainkit.`` prefix)."""
    if module.rsplit(".", 1)[-1] == "__main__":
        return 4  # a CLI entry point: nothing imports it, so it may use any layer
    head = module.split(".", 1)[0]
    for level, names in LAYERS.items():
        if head in names:
            return level
    raise AssertionError(f"trainkit.{module} is in no layer: add it to LAYERS and docs/architecture.md")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """trainkit modules ``path`` imports (without the prefix), outside ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(nodes: list[ast.stmt], top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking(node):
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("trainkit."))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "trainkit":
                    out.update(f"trainkit.{a.name}" for a in node.names)
                elif node.module.startswith("trainkit."):
                    out.add(node.module)
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list) and children and isinstance(children[0], (ast.stmt, ast.excepthandler)):
                    nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or not top
                    if nested and top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    visit(children, top and not nested)

    visit(tree.body, True)
    return {m[len("trainkit."):] for m in out}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_import_reaches_up_a_layer():
    ups = []
    for name, path in modules().items():
        for target in imports(path, top_level_only=False):
            if layer(target) > layer(name):
                ups.append(f"trainkit.{name} (layer {layer(name)}) imports trainkit.{target} (layer {layer(target)})")
    assert not ups, "\n".join(ups)


def test_no_import_cycle_between_modules():
    known = modules()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    graph = {name: {t for t in map(resolve, imports(path, top_level_only=True)) if t and t != name}
             for name, path in known.items()}
    # A package's __init__ importing its own submodules is not a cycle worth reporting.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(f"trainkit.{c}" for c in cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself can fail: a lazy upward import inside a function is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from trainkit.launch import compose\n")
    assert imports(probe, top_level_only=False) == {"launch"}
    assert imports(probe, top_level_only=True) == set()
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainkit.config import Config\n")
    assert imports(guarded, top_level_only=False) == set()
