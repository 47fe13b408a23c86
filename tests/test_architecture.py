"""The structure the rest builds on: layers that import downward only, no cycles, one registry,
and a command line that starts without loading the numerical libraries.

``LAYERS`` below lists the layers, bottom to top: a module may import its own layer or lower
ones, at module level or inside a function (``if TYPE_CHECKING:`` imports are annotations only
and are not counted).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from modelshrink import api
from modelshrink.cli import app
from modelshrink.techniques import TECHNIQUES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "modelshrink"

# Longest prefix wins.
LAYERS: dict[str, float] = {
    "modelshrink._version": 0,
    "modelshrink.errors": 0,
    "modelshrink.flags": 0,
    "modelshrink.gates": 1,
    "modelshrink.options": 1,
    "modelshrink.signals": 1,
    "modelshrink.graph": 2,
    "modelshrink.inputs": 2,
    "modelshrink.runtime": 2,
    "modelshrink.io": 3,
    "modelshrink.feeds": 3,
    "modelshrink.dataset": 3,
    "modelshrink.measure": 3,
    "modelshrink.verify": 4,
    "modelshrink.sessions": 4,
    "modelshrink.techniques": 5,
    "modelshrink.verdict": 6,
    "modelshrink.report": 6,
    "modelshrink.inspection": 7,
    "modelshrink.pipeline": 8,
    "modelshrink.api": 9,
    "modelshrink.auto": 9.5,
    "modelshrink.cli": 10,
    "modelshrink.__main__": 11,
    "modelshrink._entry": 11,
    "modelshrink": 11,  # the package front: lazy names for the Python API
}
# Inside the techniques layer, the shared pieces sit below the packages.
TECHNIQUE_BASE = (
    "modelshrink.techniques.spec",
    "modelshrink.techniques.base",
    "modelshrink.techniques.floor_search",
    "modelshrink.techniques.layerwise",
    "modelshrink.techniques.chain",
)


def layer(module: str) -> float:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    value = float(LAYERS[best])
    if module in TECHNIQUE_BASE:
        value -= 0.5
    return value


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level, line) for every modelshrink import outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend(
                    (a.name, top, child.lineno) for a in child.names if a.name.startswith("modelshrink")
                )
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base])
                if base.startswith("modelshrink"):
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        found.append((sub if _exists(sub) else base, top, child.lineno))
            nested = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, nested)

    visit(tree, True)
    return found


def _exists(module: str) -> bool:
    path = ROOT / Path(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_import_points_down_or_sideways() -> None:
    climbing = []
    for path in SOURCES:
        source = _module_name(path)
        for target, top, line in _imports(path):
            if layer(target) > layer(source):
                where = "module level" if top else "inside a function"
                climbing.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({where})")
    assert not climbing, "imports that climb a layer:\n" + "\n".join(climbing)


def test_no_import_cycles_at_module_level() -> None:
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        graph[_module_name(path)] = {t for t, top, _ in _imports(path) if top}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layer_table_knows_every_module() -> None:
    for path in SOURCES:
        assert layer(_module_name(path)) >= 0


# --- one registry, one front door ------------------------------------------------------------

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_every_technique_has_a_command_an_api_function_docs_and_an_inspect_entry(name: str) -> None:
    spec = TECHNIQUES[name]
    assert name in COMMANDS, f"no command for {name}"
    assert callable(getattr(api, name)), f"no api.{name}"
    assert f"### `modelshrink {name}`" in README or (ROOT / "docs" / f"{name}.md").exists()
    from modelshrink.inspection import _TECHNIQUE_OPS

    assert name in _TECHNIQUE_OPS
    # every config field a user sets is a flag of the command, under its declared name
    flags = {opt for p in COMMANDS[name].params for opt in p.opts}
    from modelshrink.flags import flag_fields

    for f, meta in flag_fields(spec.config):
        assert (meta.names or ("--" + f.name.replace("_", "-"),))[0] in flags


def test_cli_declares_no_flag_itself() -> None:
    """Every option comes from a dataclass field: the CLI module has no typer.Option( calls
    besides --version."""
    source = (PACKAGE / "cli.py").read_text()
    assert source.count("typer.Option(") == 2  # the generic builder's and --version's


# --- start-up --------------------------------------------------------------------------------

_PROBE = r"""
import sys
from modelshrink.cli import app
try:
    app({args!r}, standalone_mode=False)
except SystemExit:
    pass
print(sorted(m for m in ("onnx", "onnxruntime", "onnx_ir", "numpy") if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (["--help"], []),
        (["--version"], []),
        (["prune", "--help"], []),
        (["quantize", "--help"], []),
        (["inspect", str(ROOT / "sample_models" / "digits_cnn.onnx"), "-q"], ["numpy", "onnx", "onnx_ir"]),
    ],
)
def test_help_loads_no_numerical_library_and_inspect_no_onnxruntime(
    args: list[str], allowed: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(args=args)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = result.stdout.strip().splitlines()[-1]
    assert loaded == repr(allowed), result.stdout
