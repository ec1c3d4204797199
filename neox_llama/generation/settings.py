"""What every generation path shares: a request's sampling settings, the rules they follow, and the error for a
request that cannot be served. Generation itself is :class:`~neox_llama.generation.language_model.LanguageModel`
(batched, through the model's one forward pass); the plain batch-1 loop it is tested against is
benchmarks/reference_generator.py.

The rules (:func:`check_sampling`, :func:`check_prompt_length`, :func:`check_new_tokens`) are the one place that
says which settings are valid and in what words: the server's request model (``serving/protocol.py``, a 400 naming
the field) and ``tools/generate.py`` (one error line naming the flag) both call them, each with its own names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from neox_llama.errors import NeoxLlamaError

MAX_TEMPERATURE = 2.0
"""The highest temperature accepted (OpenAI's limit)."""


class GenerationError(NeoxLlamaError):
    """A request generation cannot serve (empty prompt, prompt longer than the context)."""


class SettingError(GenerationError):
    """A sampling setting outside its rule; ``name`` is what the caller calls it (a request field, a flag)."""

    def __init__(self, name: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.name, self.code = name, code


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
    logprobs: int | None = None
    """Score every new token: its log-probability and its ``logprobs`` most likely alternatives (None: no scores)."""
    prompt_logprobs: int | None = None
    """Score the prompt's tokens too (after the first), with this many alternatives each (None: no scores)."""


def _number(name: str, value: float, rule: str) -> None:
    """A temperature or top-p is a finite number (JSON's NaN and Infinity and the command line's "nan" are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingError(name, f"{name} must be a number {rule}, got {value!r}")
    if math.isnan(value):
        raise SettingError(name, f"{name} is NaN, not a number; it must be {rule}")
    if math.isinf(value):
        raise SettingError(name, f"{name} is {value}, not a finite number; it must be {rule}")


def _integer(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(name, f"{name} must be an integer, got {value!r}")


def check_sampling(temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                   max_new_tokens: int | None = None, names: Mapping[str, str] | None = None) -> None:
    """SettingError for the first setting outside its rule (None: not given, nothing to check): ``temperature`` in
    [0, 2] (0: greedy), ``top_p`` in (0, 1], ``top_k`` and ``max_new_tokens`` at least 1. ``names`` maps each
    parameter's name to the one the caller's user wrote (``{"temperature": "--temperature"}``)."""
    def name(key: str) -> str:
        return (names or {}).get(key, key)

    if temperature is not None:
        rule = f"between 0 and {MAX_TEMPERATURE:g} (0: greedy)"
        _number(name("temperature"), temperature, rule)
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise SettingError(name("temperature"), f"{name('temperature')} must be {rule}, got {temperature:g}")
    if top_p is not None:
        _number(name("top_p"), top_p, "in (0, 1]")
        if not 0 < top_p <= 1:
            raise SettingError(name("top_p"), f"{name('top_p')} must be in (0, 1], got {top_p:g}")
    if top_k is not None:
        _integer(name("top_k"), top_k)
        if top_k < 1:
            raise SettingError(name("top_k"), f"{name('top_k')} must be at least 1 (leave it out to sample from "
                                              f"every token), got {top_k}")
    if max_new_tokens is not None:
        _integer(name("max_new_tokens"), max_new_tokens)
        if max_new_tokens < 1:
            raise SettingError(name("max_new_tokens"), f"{name('max_new_tokens')} must be at least 1, "
                                                       f"got {max_new_tokens}")


def check_prompt_length(length: int, context: int, *, generate: bool = True) -> None:
    """GenerationError when a prompt of ``length`` tokens is empty or leaves no room in a ``context`` (without
    ``generate``, a prompt only scored, it may fill the context)."""
    if not length:
        raise GenerationError("the prompt is empty")
    if not generate and length > context:
        raise GenerationError(f"the prompt has {length} tokens; the model's context is {context}")
    if generate and length >= context:
        raise GenerationError(f"the prompt has {length} tokens; the model's context is {context} and at least "
                              "one must be left to generate")


def check_new_tokens(value: int, prompt_length: int, context: int, name: str = "max_new_tokens") -> None:
    """SettingError (code ``context_length_exceeded``) when ``value`` new tokens after a prompt of
    ``prompt_length`` do not fit into ``context`` positions; the message names both lengths and the room left."""
    room = context - prompt_length
    if value > room:
        raise SettingError(name, f"the prompt has {prompt_length} tokens and {name} is {value}, but the context "
                                 f"holds {context} (at most {room} new tokens)", "context_length_exceeded")
