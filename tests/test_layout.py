"""The code's layout (DEVELOPERS.md): packages import each other without cycles, the foundation
at the top imports no stage package, and modules stay small unless their docstring says why."""

from __future__ import annotations

import ast
from pathlib import Path

import xbmd

ROOT = Path(xbmd.__file__).resolve().parent
#: The foundation: top-level modules every stage may use; they import only each other.
FOUNDATION = {"errors", "units", "volume", "geometry", "drr", "similarity", "display", "tscore",
              "stages"}  # fmt: skip
MAX_LINES = 700


def _unit(module: str) -> str:
    """xbmd.<package or top-level module> of a dotted module name."""
    return ".".join(module.split(".")[:2])


def _imports() -> dict[str, set[str]]:
    """{unit: units it imports (any import statement, at module level or inside functions)}."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("xbmd.") and _unit(name) != _unit(module):
                    edges.setdefault(_unit(module), set()).add(_unit(name))
    return edges


def test_packages_import_each_other_without_cycles():
    edges = _imports()

    def reaches(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted((a, b) for a, targets in edges.items() for b in targets if a in reaches(b))
    assert not cycles, f"import cycles between packages: {cycles}"
    assert "xbmd.pacs" not in edges.get("xbmd.estimation", set())


def test_the_foundation_imports_no_stage_package():
    edges = _imports()
    for name in FOUNDATION:
        upward = {u for u in edges.get(f"xbmd.{name}", set()) if u.removeprefix("xbmd.") not in
                  FOUNDATION}  # fmt: skip
        assert not upward, f"xbmd.{name} imports {sorted(upward)}"
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "cli"}
    assert top == FOUNDATION, f"top-level modules outside the foundation: {top - FOUNDATION}"


def test_modules_over_the_size_limit_say_why():
    for path in ROOT.rglob("*.py"):
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "Why one module" in doc, f"{path.relative_to(ROOT)}: {lines} lines, no reason"
