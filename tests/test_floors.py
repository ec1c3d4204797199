"""The floors of the package import only downward: the configuration floor (the lowest above errors/utils) imports
nothing from the model, training, parallel or later floors and nothing of torch or DeepSpeed, at module level or
inside a function (docs/architecture.md)."""

from __future__ import annotations

import ast

from helpers.runner import ROOT

ABOVE_CONFIG = ("neox_llama.model", "neox_llama.peft", "neox_llama.planning", "neox_llama.training", "neox_llama.parallel", "neox_llama.generation",
                "neox_llama.serving", "neox_llama.checkpoint", "neox_llama.convert", "neox_llama.evaluation",
                "neox_llama.data", "neox_llama.cli", "torch", "deepspeed")


def imported_modules(path, root=ROOT) -> list[tuple[int, str]]:
    """Every module ``path`` imports, wherever the import statement is (absolute names; relative ones resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)]
    return found


def test_the_configuration_floor_imports_nothing_above_it():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in sorted((ROOT / "neox_llama" / "config").glob("*.py"))
                 for line, name in imported_modules(path)
                 if name == "neox_llama.model" or name.startswith(tuple(f"{p}." for p in ABOVE_CONFIG) + ABOVE_CONFIG)]
    assert not offenders, offenders


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """What validation.py used to do (import the model's freeze parser inside a function) is caught."""
    path = tmp_path / "neox_llama" / "config" / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    from neox_llama.model.freeze import parse_freeze\n    from ..training import x\n")
    assert [name for _, name in imported_modules(path, tmp_path)] == ["neox_llama.model.freeze", "neox_llama.training"]


def module_name(path, root=ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root=ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at module level or inside functions; ``from package import
    module`` counts as importing that module)."""
    paths = sorted((root / "neox_llama").rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        edges = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = {(node.lineno, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for alias in node.names}
        for line, name in imported_modules(path, root):
            children = {f"{name}.{alias}" for ln, alias in imports if ln == line} & modules
            edges |= children or ({name} & modules)
        graph[module_name(path, root)] = edges - {module_name(path, root)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles (imports inside functions count): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_walk_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    """The old model/ circle in small: factory imports lora inside a function, lora imports factory at the top."""
    package = tmp_path / "neox_llama" / "model"
    package.mkdir(parents=True)
    (tmp_path / "neox_llama" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "factory.py").write_text("def lora():\n    from neox_llama.model.lora import LoRA\n")
    (package / "lora.py").write_text("from neox_llama.model import factory\n")
    (package / "init.py").write_text("from . import lora\n")
    assert cycles(import_graph(tmp_path)) == [["neox_llama.model.factory", "neox_llama.model.lora"]]


FLOORS = {
    "errors": 0, "utils": 0,
    "distributed": 1, "config": 1, "tokenizers": 1,
    "model": 2, "data": 2,
    "peft": 3, "parallel": 3,
    "checkpoint": 4,
    "generation": 5, "convert": 5,
    "evaluation": 6, "serving": 6, "planning": 6,
    "training": 7,
    "cli": 8,
}
"""Each package's floor (docs/architecture.md): a module imports only packages on lower floors, or its own."""


def test_every_floor_imports_only_downward():
    def package(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    graph = import_graph()
    unplaced = sorted({package(m) for m in graph} - set(FLOORS) - {""})
    assert not unplaced, f"packages with no floor in FLOORS (and docs/architecture.md): {unplaced}"
    upward = sorted(f"{a} imports {b}" for a, edges in graph.items() for b in edges
                    if package(a) and package(b) and package(a) != package(b)
                    and FLOORS[package(b)] >= FLOORS[package(a)])
    assert not upward, upward
