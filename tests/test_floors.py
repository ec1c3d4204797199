"""The floors of the package import only downward: the configuration floor (the lowest above errors/utils) imports
nothing from the model, training, parallel or later floors and nothing of torch or DeepSpeed, at module level or
inside a function (docs/architecture.md)."""

from __future__ import annotations

import ast

from helpers.runner import ROOT

ABOVE_CONFIG = ("neox_llama.model", "neox_llama.training", "neox_llama.parallel", "neox_llama.generation",
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
