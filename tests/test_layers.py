"""The layers of docs/architecture.md, enforced over kd/ by reading its imports (a small AST walk).

A module may import its own layer and the layers below it, never one above; nothing imports in a
circle (imports under `if TYPE_CHECKING:` included: a type is no reason for a back-reference); a function imports
none of kd's own modules except in the command line (whose handlers load what they run when they
run, so that `kd --help` stays light) or on a line whose comment says why; a method never names the engine (the layers forbid it) and the engine never
names a method (only the registry, `kd.methods` and `kd.methods.base`) and imports no mlflow; analysis never
names the engine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KD = ROOT / "kd"

# Bottom first. A module's layer is that of the longest prefix listed.
LAYERS: list[tuple[str, ...]] = [
    ("kd", "kd.errors", "kd.faults", "kd.safe_pickle"),  # imports nothing from kd above it
    ("kd.data", "kd.models", "kd.methods", "kd.presets"),  # the registries, on errors
    ("kd.spec",),  # a spec's names and options are checked against the registries
    ("kd.tracking",),  # runs, journals, the store; never the engine
    ("kd.engine",),  # trains specs, records them through tracking
    ("kd.cluster", "kd.tuning", "kd.analysis", "kd.bench", "kd.demo"),  # use the engine and tracking
    ("kd.cli", "kd.flags", "kd.analysis.cli", "kd.cluster.cli", "kd.tuning.cli"),  # the command line
]
COMMAND_LINE = len(LAYERS) - 1
# What the engine may name of the methods: the registry and the base class, never one method.
ENGINE_SEES_OF_METHODS = {"kd.methods", "kd.methods.base"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(KD.rglob("*.py"))}


def layer(module: str) -> int:
    best, rank = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) >= len(best):
                best, rank = name, i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return rank


def imports(module: str) -> list[tuple[str, int, bool, str, bool]]:
    """(imported kd module, line, inside a function, the source line, only for type checking) for
    every import of kd."""
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    found: list[tuple[str, int, bool, str, bool]] = []

    def visit(node: ast.AST, in_function: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            typing = typing_only or (isinstance(child, ast.If) and isinstance(child.test, ast.Name)
                                     and child.test.id == "TYPE_CHECKING")
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this package
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for target in dict.fromkeys(targets):
                if target == "kd" or target.startswith("kd."):
                    found.append((target, child.lineno, inside, lines[child.lineno - 1], typing))
            visit(child, inside, typing)

    visit(ast.parse(source), False, False)
    return found


EDGES = {module: imports(module) for module in MODULES}


def test_every_import_points_down_or_sideways():
    wrong = [f"{module}:{line} imports {target} (layer {layer(target)} above {layer(module)})"
             for module, found in EDGES.items() for target, line, *_ in found if layer(target) > layer(module)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = {m: {t for t, *_ in found if t in MODULES and t != m}  # imports for type checking too
             for m, found in EDGES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert not circles, "\n".join(circles)


def test_functions_import_no_kd_module_outside_the_command_line():
    wrong = [f"{module}:{line}: {text.strip()}" for module, found in EDGES.items()
             for _, line, inside, text, _ in found
             if inside and layer(module) != COMMAND_LINE and "#" not in text]
    assert not wrong, "import at the top, or say why in a comment on the line:\n" + "\n".join(wrong)


def test_library_never_imports_the_command_line():
    wrong = [f"{module}:{line} imports {target}" for module, found in EDGES.items() for target, line, *_ in found
             if layer(target) == COMMAND_LINE and layer(module) != COMMAND_LINE]
    assert not wrong, "\n".join(wrong)


def test_the_engine_names_no_method_and_tracking_and_analysis_no_engine():
    """Analysis reads what runs recorded (loss names from kd.methods.base, the device from
    kd.tracking.system): it never needs the trainer."""
    wrong = [f"{module}:{line} imports {target}" for module, found in EDGES.items() for target, line, *_ in found
             if (module.startswith("kd.engine") and target.startswith("kd.methods")
                 and target not in ENGINE_SEES_OF_METHODS)
             or (module.startswith(("kd.tracking", "kd.methods", "kd.analysis")) and target.startswith("kd.engine"))]
    assert not wrong, "\n".join(wrong)


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions and type-checking blocks too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


def test_the_engine_reaches_the_store_only_through_tracking():
    """The engine records through its runs' trackers (kd/tracking/session.py): it imports no mlflow."""
    wrong = [f"{module} imports {name}" for module, path in MODULES.items() if module.startswith("kd.engine")
             for name in sorted(imported_names(path)) if name == "mlflow" or name.startswith("mlflow.")]
    assert not wrong, "\n".join(wrong)


def test_method_options_read_from_the_files_are_the_methods_own():
    from kd.flags import method_options
    from kd.methods import METHODS

    assert method_options() == {name: dict(cls.options) for name, cls in METHODS.items()}


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], ["tune", "--help"], ["submit", "--help"],
                                  ["report", "--help"], ["bench", "--help"]])
def test_help_loads_neither_torch_nor_mlflow(argv):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "kd.cli", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not loaded & {"torch", "mlflow"}
    if argv[0] == "distill":
        assert "--rkd-angle-weight" in done.stdout and "--nst-weight" in done.stdout
