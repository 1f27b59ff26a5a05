"""The import layers of docs/ARCHITECTURE.md hold, counting the imports inside functions too.

import-linter (``make lint``, contracts in pyproject.toml) checks the layer order. This test builds the same graph
with grimp and checks what the contracts do not: no import cycle between modules nor between layer units
(``lavis.<package>``; each ``lavis.predecessors`` module sits on its own floor), and few lavis-internal imports inside
functions, each with a ``# lazy: <reason>`` comment on its line."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LEVEL = 12
"""docs/ARCHITECTURE.md: lavis-internal imports inside functions only to keep a heavy dependency lazy."""


def _module_path(module: str) -> Path:
    base = REPO / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _deferred_lines(path: Path) -> tuple[set[int], set[int]]:
    """Line numbers of the imports inside functions, and of those under ``if TYPE_CHECKING:``."""
    in_function: set[int] = set()
    type_checking: set[int] = set()

    def walk(node: ast.AST, func: bool, tc: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (in_function if func else type_checking if tc else set()).add(child.lineno)
            is_tc = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            walk(child, func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)), tc or is_tc)

    walk(ast.parse(path.read_text()), False, False)
    return in_function, type_checking


@cache  # the graph of the tree under test, built once for all the tests of this file
def _imports() -> tuple[tuple[str, str, int, bool], ...]:
    """Every lavis-internal import: (importer, imported, line, inside a function); annotation-only ones left out."""
    graph = grimp.build_graph("lavis", include_external_packages=False)
    out = []
    for importer in sorted(graph.modules):
        in_function, type_checking = _deferred_lines(_module_path(importer))
        for imported in graph.find_modules_directly_imported_by(importer):
            for d in graph.get_import_details(importer=importer, imported=imported):
                if d["line_number"] not in type_checking:
                    out.append((importer, imported, d["line_number"], d["line_number"] in in_function))
    return tuple(out)


def _unit(module: str) -> str:
    parts = module.split(".")
    # predecessors and vlm are packages whose modules sit on different floors (docs/ARCHITECTURE.md "Layers")
    return ".".join(parts[:3] if parts[1] in ("predecessors", "vlm") and len(parts) > 2 else parts[:2])


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def _edges(imports: Sequence[tuple[str, str, int, bool]], key, module_level_only: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for a, b, _, in_function in imports:
        if not (module_level_only and in_function) and key(a) != key(b):
            edges[key(a)].add(key(b))
    return edges


def _where(module: str, line: int) -> str:
    return f"{_module_path(module).relative_to(REPO)}:{line}"


def test_no_module_import_cycle_at_module_level():
    """Importing any module never re-enters a half-initialised one (module-level imports only)."""
    cycle = _cycle(_edges(_imports(), lambda m: m, module_level_only=True))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_no_package_cycle_counting_function_imports():
    """The layer units form no cycle, counting the imports inside functions too."""
    cycle = _cycle(_edges(_imports(), _unit, module_level_only=False))
    assert cycle is None, "import cycle between layer units: " + " -> ".join(cycle or [])


def test_no_module_cycle_counting_function_imports():
    """Nor do the modules: an import inside a function never dodges a cycle."""
    cycle = _cycle(_edges(_imports(), lambda m: m, module_level_only=False))
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle or [])


def _function_level() -> list[tuple[str, str]]:
    """(file:line, source line) of every lavis-internal import inside a function."""
    seen: dict[str, str] = {}
    for a, _, line, in_function in _imports():
        if in_function:
            seen[_where(a, line)] = _module_path(a).read_text().splitlines()[line - 1].strip()
    return sorted(seen.items())


def test_function_level_imports_say_why():
    """Each lavis-internal import inside a function names its reason (``# lazy: ...``) on its line."""
    missing = [where for where, text in _function_level() if "# lazy:" not in text]
    assert not missing, f"{len(missing)} imports inside functions without '# lazy: <reason>':\n" + "\n".join(missing)


def test_few_function_level_imports():
    found = _function_level()
    assert len(found) <= MAX_FUNCTION_LEVEL, (f"{len(found)} lavis-internal imports inside functions (at most "
                                              f"{MAX_FUNCTION_LEVEL}): import at module level, or keep a heavy "
                                              "dependency lazy with '# lazy: <reason>'\n" +
                                              "\n".join(w for w, _ in found))
