"""The architecture's one rule: algorithms and formats import no Ray or DeepSpeed."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "forge_ray"
PURE = sorted((PKG / "core").rglob("*.py")) + sorted((PKG / "data").rglob("*.py"))

# CPython 3.11 keeps the AST constructor's recursion counter per interpreter, not per
# thread (gh-106905). A Ray Data thread left by an earlier test that logs a traceback
# (3.11's traceback formatting parses source) can make an ast.parse here fail with
# "AST constructor recursion depth mismatch". So every file is parsed once, in a fresh
# interpreter with no other threads. Each import becomes [module, level, names]:
# names is null for ``import module``, the imported names for ``from module import``.
_PARSE = """
import ast, json, sys
out = {}
for path in sys.argv[1:]:
    rows = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), filename=path)):
        if isinstance(node, ast.Import):
            rows += [[a.name, 0, None] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            rows.append([node.module or "", node.level, [a.name for a in node.names]])
    out[path] = rows
json.dump(out, sys.stdout)
"""


@functools.cache
def _imports() -> dict[Path, list[tuple[str, int, list[str] | None]]]:
    """Every forge_ray file -> its import statements, as described above."""
    paths = [str(p) for p in sorted(PKG.rglob("*.py"))]
    done = subprocess.run([sys.executable, "-c", _PARSE, *paths], capture_output=True, text=True,
                          check=True)
    return {Path(p): [tuple(r) for r in rows] for p, rows in json.loads(done.stdout).items()}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for module, level, names in _imports()[path]:
        if names is None or (module and level == 0):
            roots.add(module.split(".")[0])
    return roots


def test_there_are_pure_modules():
    assert len(PURE) > 20


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(PKG)))
def test_no_ray_or_deepspeed_below_core_and_data(path):
    assert not imported_roots(path) & {"ray", "deepspeed"}


def _module_imports() -> dict[str, set[str]]:
    """forge_ray module -> the forge_ray modules it imports (lazy imports included)."""
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph = {}
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for module, level, names in _imports()[p]:
            if names is None:
                out.add(module)
                continue
            base = module
            if level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - level + 1] + ([base] if base else []))
            out |= {f"{base}.{a}" if f"{base}.{a}" in mods else base for a in names}
        graph[name] = {d for d in out if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_circles():
    """Every module can be read (and imported) after what it imports: no cycles."""
    graph, state, cycles = _module_imports(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
