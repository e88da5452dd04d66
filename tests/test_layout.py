"""The package stays walkable: no import cycles (function-level imports count too), no module
importing another's private names, no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "mlx_gemma_tune"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """module -> the package modules it imports anywhere in its body; and `from m import _private` lines."""
    edges, private = {m: set() for m in mods}, []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in mods else node.module
                    if target in mods and target != m:
                        edges[m].add(target)
                        if target == node.module and alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{m} imports {full}")
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return edges, private


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles_and_no_private_names_across_modules():
    mods = _modules()
    assert "mlx_gemma_tune.cli" in mods and len(mods) > 30
    edges, private = _imports(mods)
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert private == []


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from pkg.b import _hidden\n")  # inside a function
    (tmp_path / "b.py").write_text("from pkg import a\n_hidden = 1\n")
    edges, private = _imports({"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"})
    assert edges == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}} and private == ["pkg.a imports pkg.b._hidden"]
    assert _cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (over {MAX_LINES} lines): {long}"


def test_only_the_ui_package_imports_rich():
    users = set()
    for m, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "rich" or n.startswith("rich.") for n in names):
                users.add(m.removeprefix("mlx_gemma_tune."))
    assert users == {"ui", "ui.chat", "ui.train"}
