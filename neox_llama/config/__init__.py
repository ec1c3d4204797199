"""Configuration: schema, loading and merging YAML files, validation, and the derived DeepSpeed config.

Typical use::

    cfg = load_config(["configs/llama3/tiny.yml", "configs/local.yml"], ["train_iters=10"], world_size=2)
    cfg.hidden_size, cfg.derived.data_parallel_size, deepspeed_config(cfg)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from neox_llama.config.deepspeed_json import deepspeed_config
from neox_llama.config.loading import ConfigError, build_config, dump_raw, load_raw
from neox_llama.config.schema import Config, Derived
from neox_llama.config.validation import resolve, zero_text

__all__ = ["Config", "ConfigError", "Derived", "deepspeed_config", "dump_raw", "load_config", "resolve", "zero_text"]


def load_config(files: Sequence[str | os.PathLike], overrides: Sequence[str] = (), *,
                world_size: int = 1, accelerator: str = "cpu", apply_presets: bool = True,
                tokenizer_vocab: int | None = None) -> Config:
    """Merge ``files`` and ``key=value`` ``overrides``, type-check, and validate for ``world_size`` ranks.

    ``apply_presets=False`` for a file that is already merged (see :func:`load_raw`).
    """
    raw, sources = load_raw(files, overrides, apply_presets=apply_presets)
    problems: list[str] = []
    cfg = build_config(raw, sources, problems=problems)
    try:
        resolve(cfg, world_size, accelerator, tokenizer_vocab=tokenizer_vocab)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return cfg
