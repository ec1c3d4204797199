"""Switching every attached adapter (LoRA, Adapter, Adapter v2) off for a while: the frozen base alone answers.

A preference run's reference model is its policy with the adapters switched off inside the same step
(:func:`adapters_disabled`), so no second copy of the weights is needed. The switch is a context variable, read by
each adapter as it runs, so a model with no adapters is unaffected and nothing is detached or re-attached.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_DISABLED = contextvars.ContextVar("neox_llama_adapters_disabled", default=False)


@contextmanager
def adapters_disabled() -> Iterator[None]:
    """Inside: every adapter passes its layer's output through unchanged (LoRA adds nothing, Adapter v2 neither
    scales nor shifts, an Adapter's prompt attention adds nothing)."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def adapters_enabled() -> bool:
    return not _DISABLED.get()
