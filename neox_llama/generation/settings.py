"""What every generation path shares: a request's sampling settings, and the error for a request that cannot be
served. Generation itself is :class:`~neox_llama.generation.language_model.LanguageModel` (batched, through the
model's one forward pass); the plain batch-1 loop it is tested against is benchmarks/reference_generator.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from neox_llama.errors import NeoxLlamaError


class GenerationError(NeoxLlamaError):
    """A request generation cannot serve (empty prompt, prompt longer than the context)."""


@dataclass
class GenerationSettings:
    """One request's sampling: greedy at temperature 0, else top-k / top-p sampling from its own seeded generator."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: set[int] = field(default_factory=set)
    stop_strings: list[str] = field(default_factory=list)
