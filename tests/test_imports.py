"""No module of shoal imports itself back, through others, at import time.

`from shoal.server import sse` runs `shoal/server/__init__.py` first: it counts as importing the
package as well as the submodule. Imports inside functions and under `TYPE_CHECKING` do not run
at import time and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_time_imports(path: Path, modules: set[str]) -> set[str]:
    """The shoal modules `path` imports when it is imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)

    walk(tree.body)
    return found & modules


def cycles_in(imports: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1  # on the current path
        path.append(module)
        for imported in sorted(imports[module]):
            if state.get(imported) == 1:
                found.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, path)
        path.pop()
        state[module] = 2

    for module in sorted(imports):
        if module not in state:
            visit(module, [])
    return found


def test_a_cycle_is_found() -> None:
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles_in({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back() -> None:
    files = {module_name(p): p for p in (SRC / "shoal").rglob("*.py")}
    imports = {name: import_time_imports(path, set(files)) - {name} for name, path in files.items()}
    assert not cycles_in(imports), [" -> ".join(c) for c in cycles_in(imports)]
