"""The one helper every schema field is declared with: a default, a one-line doc and optional bounds."""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any


def doc_field(default: Any, doc: str, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    """A dataclass field carrying its documentation line and optional numeric bounds (checked on load).

    Mutable defaults (lists, dataclass instances) are copied per instance.
    """
    metadata = {"doc": doc, "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict)) or hasattr(default, "__dataclass_fields__"):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)
