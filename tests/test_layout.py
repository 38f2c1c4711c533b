"""The package layout holds: imports only go down the layers, no import cycles, no function over 60 lines.

The layers, top to bottom, are the ones README and docs/design.md show.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "pipeline"
LAYERS = [
    # the public face; start-up's command and usage compose the config, so they sit here (only the CLI uses them)
    ("pipeline", "pipeline.__main__", "pipeline.api", "pipeline.startup.command", "pipeline.startup.usage"),
    ("pipeline.conf",),  # Hydra's config package: registers the schema and the resolvers
    ("pipeline.sweeps",),
    ("pipeline.engine",),
    ("pipeline.stages",),
    ("pipeline.measure",),
    ("pipeline.parallel",),
    ("pipeline.loading",),
    ("pipeline.planning",),
    ("pipeline.quant",),
    ("pipeline.hf",),
    ("pipeline.checkpoint",),
    ("pipeline.startup",),  # what runs before torch: stdlib at module level (pipeline/startup/__init__.py)
    ("pipeline.dtypes", "pipeline.sizes", "pipeline.names", "pipeline.cache_home", "pipeline.data", "pipeline.schema"),
    ("pipeline.errors",),
]
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best and name != "pipeline":
                best, found = len(name), i
    if found is None and module == "pipeline":
        return 0
    assert found is not None, f"{module} belongs to no layer: add it to LAYERS, README and docs/design.md"
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Pipeline modules imported anywhere in the file (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in MODULES:
                out.add(c)
                break
    out.discard(module)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    own = _layer(module)
    upward = [m for m in GRAPH[module] if _layer(m) < own]
    assert not upward, f"{module} imports from a layer above it: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in GRAPH[m]:
            if n.startswith(m + "."):
                continue  # a package's __init__ re-exporting its own modules
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in GRAPH:
        if m not in state:
            visit(m, [])


def test_no_function_over_60_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
