"""Bad-input cases by kind of input, one module each (text, corpora, weights, ...): every ``case_NAME`` function of
every module here joins tests/test_bad_inputs.py's parametrised test (see helpers/bad_inputs.py for the contract)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable


def collect() -> dict[str, Callable]:
    """``NAME`` -> case function, over every module of this package (a name used twice is an error)."""
    cases: dict[str, Callable] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, fn in vars(module).items():
            if name.startswith("case_") and callable(fn):
                key = name.removeprefix("case_")
                if key in cases:
                    raise ValueError(f"bad-input case {key!r} is defined twice")
                cases[key] = fn
    return cases
