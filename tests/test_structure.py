"""The package's layers import one way only.

The layers, the absence of cycles between a package's modules and what the math may not import
are import-linter contracts in pyproject.toml (``[tool.importlinter]``), run here and by ``make
test``; a planted upward import shows that they bite. What the contracts do not state is tested
by hand: no cycle through a package's ``__init__`` and its own modules (import-linter looks at
siblings only), and cartlib is never imported inside a function (only optional heavy
dependencies are)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cartlib"
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in PKG.rglob("*.py")}


def _imports(tree: ast.Module, known: set[str]) -> list[tuple[str, ast.AST]]:
    """(imported cartlib module, node) of every import in ``tree``, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name.startswith("cartlib")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cartlib"):
            for a in node.names:  # `from cartlib import train` imports the module cartlib.train
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in known else node.module, node))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {t for t, _ in _imports(tree, known) if t != m} for m, tree in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not state.get(child) and child in graph:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_package_imports_have_no_cycle():
    """Module by module, so also a package's ``__init__`` and a module of its own, which the
    acyclic_siblings contract (cycles between siblings) does not see."""
    graph = import_graph()
    assert len(graph) > 20  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package and pyproject.toml in ``root`` (no cache folder)."""
    cmd = [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 broken" in done.stdout, done.stdout


def test_import_contracts_catch_a_planted_upward_import(tmp_path):
    """The model importing the training layer breaks the layers and the no-cycle contracts."""

    def not_source(folder, names):  # the shipped checkpoints, presets, caches
        return [n for n in names if (Path(folder) / n).is_file() and not n.endswith(".py")]

    shutil.copytree(PKG, tmp_path / "cartlib", ignore=not_source)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    transformer = tmp_path / "cartlib" / "model" / "transformer.py"
    transformer.write_text(transformer.read_text() + "\nfrom cartlib import train  # planted\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cartlib.model is not allowed to import cartlib.train" in done.stdout, done.stdout
    assert "No cycles are allowed in cartlib." in done.stdout, done.stdout


def test_cartlib_is_never_imported_inside_a_function():
    mods = _modules()
    known = set(mods)
    inside = []
    for name, tree in mods.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{name}.{fn.name} imports {t}" for t, _ in _imports(fn, known)]
    assert not inside, inside
