"""The package layout: no import cycle, layers that only look down, no private names between CLI modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minigpt"
# lower layers first; a module may import its own layer and the ones before it
LAYERS = ["errors", "_checkout", "models", "io", "ops", "pipeline", "tools", "cli", "__main__"]


def _name(path: Path) -> str:
    parts = ["minigpt", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
EXTERNAL = {"_C", "kernels"}  # the compiled extension and the top-level kernels/ folder shipped as minigpt.kernels


def _imports(path: Path):
    """``(imported module, names, lazy)`` for every ``import`` in the module, module level and inside functions."""
    tree = ast.parse(path.read_text())
    lazy = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy |= {id(n) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], id(node) in lazy
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, [a.name for a in node.names], id(node) in lazy


def _edges(module: str) -> set[str]:
    """The package's modules ``module`` imports (``from pkg import sub`` counts as ``pkg.sub``; ``minigpt._C`` and
    ``minigpt.kernels``, not Python files of this folder, are left out)."""
    out = set()
    for target, names, _ in _imports(MODULES[module]):
        subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
        other = [n for n in names if f"{target}.{n}" not in MODULES and not (target == "minigpt" and n in EXTERNAL)]
        out |= subs | ({target} if target in MODULES and (other or not names) else set())
    return out - {module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_layout_has_the_pipeline_folders():
    for folder in ("models", "ops", "pipeline", "tools", "cli"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem not in {"__init__", "__main__", "_checkout", "errors",
                                                                       "io"}], "flat modules left at the top"


def test_no_import_cycle_between_modules():
    graph = {m: _edges(m) for m in MODULES if m != "minigpt"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_cycle_between_folders_and_layers_look_down():
    graph = {}
    for m in MODULES:
        if m == "minigpt":
            continue  # the public facade imports every layer; nothing inside imports it (checked below)
        for t in _edges(m):
            assert t != "minigpt", f"{m} imports the package facade; import the module instead"
            for layer in (_layer(m), _layer(t)):
                assert layer in LAYERS, f"minigpt.{layer}: put it in a folder, or give it a place in LAYERS"
            if _layer(t) != _layer(m):
                graph.setdefault(_layer(m), set()).add(_layer(t))
                assert LAYERS.index(_layer(t)) < LAYERS.index(_layer(m)), f"{m} imports {t}: a layer above it"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cli_modules_import_no_private_names_from_each_other():
    for module, path in MODULES.items():
        if not module.startswith(("minigpt.cli", "minigpt.tools")):
            continue
        for target, names, _ in _imports(path):
            if target.startswith("minigpt.cli") and target != module:
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{module} imports {private} from {target}"


def test_tools_do_not_import_the_cli():
    for module, path in MODULES.items():
        if _layer(module) in ("models", "ops", "pipeline", "tools"):
            assert not [t for t, _, _ in _imports(path) if t.startswith("minigpt.cli")], module


@pytest.mark.parametrize("argv", [["-m", "minigpt", "--help"], ["-m", "minigpt.cli", "prune", "--help"]])
def test_module_entry_points(argv):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "usage: minigpt" in out
