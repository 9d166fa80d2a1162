"""The package's import structure: one direction between layers, no cycles, small modules.

The layers, from the faces down to the leaves (docs/architecture.md):
cli/app/demo -> training -> retrieval -> models -> tuner -> proxies -> modules -> offline -> data -> leaves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vpdml"
LAYERS: dict[str, int] = {
    "vpdml": 10,  # the public API re-exports from every layer
    "vpdml.cli": 9,
    "vpdml.app": 9,
    "vpdml.demo": 9,
    "vpdml.training": 8,
    "vpdml.retrieval": 7,
    "vpdml.models": 6,
    "vpdml.tuner": 5,
    "vpdml.proxies": 4,
    "vpdml.modules": 3,
    "vpdml.offline": 2,
    "vpdml.data": 1,
    "vpdml.hub": 0,
    "vpdml.plots": 0,
    "vpdml.atomic_io": 0,
    "vpdml.version": 0,
}
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    group = ".".join(module.split(".")[:2])
    if group not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add {group!r} to LAYERS and docs/architecture.md")
    return LAYERS[group]


def imported_modules(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """``(module, at function level)`` for every vpdml module ``path`` imports (``from x import sub`` counts
    ``x.sub`` when it is a module)."""
    tree = ast.parse(path.read_text())
    function_level = {
        id(node)
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(func)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in known else node.module for name in names]
        else:
            continue
        found += [(name, id(node) in function_level) for name in names if name.split(".")[0] == "vpdml"]
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {target for target, _ in imported_modules(path, set(known)) if target != name}
        for name, path in known.items()
    }


def test_no_relative_imports():
    relative = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative, f"use absolute vpdml.* imports: {relative}"


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target in graph and state.get(target) is None:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_imports_only_go_down_the_layers():
    upward = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if target.split(".")[:2] != source.split(".")[:2] and layer_of(target) > layer_of(source)
    ]
    assert not upward, f"imports that go up a layer: {upward}"


def test_function_level_imports_only_keep_the_command_line_fast():
    """Deferred imports of vpdml modules are for `vpdml --help` and `vpdml demo --help` (the command line loads a
    command's code when the command runs) and for `import vpdml` (the package root loads ImageEmbedder, which
    needs `datasets`, on first use)."""
    known = set(modules())
    deferred = [
        f"{name} imports {target}"
        for name, path in modules().items()
        for target, at_function_level in imported_modules(path, known)
        if at_function_level and not (name.startswith(("vpdml.cli", "vpdml.demo")) or name == "vpdml")
    ]
    assert not deferred, deferred


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE))
)
def test_modules_stay_small(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by concept"


def test_the_model_kind_is_asked_in_one_place():
    """Only vpdml.models.protocol asks whether it holds a PeftModel or a FullFineTuningDML."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) == "vpdml.models.protocol":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "isinstance"
                and len(node.args) == 2
            ):
                kinds = ast.unparse(node.args[1])
                if "PeftModel" in kinds or "FullFineTuningDML" in kinds:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders
