"""The shipped configs by name: model presets picked the LitGPT way (``model_name: Meta-Llama-3-8B``), and every
file of the package data ``neox_llama.configs`` by its path under ``configs/`` (``llama3/tiny``, ``local.yml``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIG_DIR = Path(str(files("neox_llama.configs")))
"""The presets: the repository's configs/ folder, installed as the package data ``neox_llama.configs``."""

PRESETS: dict[str, str] = {
    "Llama-2-7b-hf": "llama2/7B.yml",
    "Llama-2-13b-hf": "llama2/13B.yml",
    "Llama-2-70b-hf": "llama2/70B.yml",
    "Meta-Llama-3-8B": "llama3/8B.yml",
    "Meta-Llama-3-70B": "llama3/70B.yml",
    "Llama-3.1-8B": "llama3.1/8B.yml",
    "Llama-3.1-70B": "llama3.1/70B.yml",
    "Llama-3.1-405B": "llama3.1/405B.yml",
    "Llama-3.2-1B": "llama3.2/1B.yml",
    "Llama-3.2-3B": "llama3.2/3B.yml",
    "tiny-llama2": "llama2/tiny.yml",
    "tiny-llama3": "llama3/tiny.yml",
    "tiny-llama3.1": "llama3.1/tiny.yml",
    "tiny-llama3.2": "llama3.2/tiny.yml",
}
"""Canonical name (the Hugging Face repository name) -> preset file under configs/."""

ALIASES: dict[str, str] = {
    "Llama-2-7b-chat-hf": "Llama-2-7b-hf",
    "Llama-2-13b-chat-hf": "Llama-2-13b-hf",
    "Llama-2-70b-chat-hf": "Llama-2-70b-hf",
    "Meta-Llama-3-8B-Instruct": "Meta-Llama-3-8B",
    "Meta-Llama-3-70B-Instruct": "Meta-Llama-3-70B",
    "Meta-Llama-3.1-8B": "Llama-3.1-8B",
    "Meta-Llama-3.1-70B": "Llama-3.1-70B",
    "Meta-Llama-3.1-405B": "Llama-3.1-405B",
    "Llama-3.1-8B-Instruct": "Llama-3.1-8B",
    "Llama-3.1-70B-Instruct": "Llama-3.1-70B",
    "Llama-3.1-405B-Instruct": "Llama-3.1-405B",
    "Llama-3.2-1B-Instruct": "Llama-3.2-1B",
    "Llama-3.2-3B-Instruct": "Llama-3.2-3B",
}
"""Chat/instruct variants share their base model's architecture."""


def canonical_name(name: str) -> str | None:
    """The preset name for ``name`` (an ``org/`` prefix and letter case are ignored), or None."""
    short = name.split("/")[-1].lower()
    for known in PRESETS:
        if known.lower() == short:
            return known
    for alias, target in ALIASES.items():
        if alias.lower() == short:
            return target
    return None


def preset_path(name: str) -> Path | None:
    """Path of the preset file selected by ``name``, or None for an unknown name."""
    known = canonical_name(name)
    return CONFIG_DIR / PRESETS[known] if known else None


def known_names() -> list[str]:
    """Every accepted name, canonical ones first."""
    return list(PRESETS) + list(ALIASES)


def shipped_config(name: str) -> Path | None:
    """The shipped config file that ``name`` names, or None.

    ``name`` is a file's path under the repository's ``configs/`` (the package data ``neox_llama.configs``), with or
    without ``configs/`` in front and ``.yml`` at the end (``llama3/tiny``, ``configs/llama3/tiny.yml``, ``local``,
    ``finetune/lora.yml``), or a model name (``Meta-Llama-3-8B``, ``tiny-llama3``).
    """
    relative = name.strip().removeprefix("./").removeprefix("configs/")
    root = CONFIG_DIR.resolve()
    for candidate in (relative, f"{relative}.yml", f"{relative}.yaml"):
        path = CONFIG_DIR / candidate
        if candidate and path.is_file() and path.resolve().is_relative_to(root):
            return path
    return preset_path(name)


def shipped_names() -> list[str]:
    """Every shipped config file by the name :func:`shipped_config` takes (``llama3/tiny``, ``local``, ...)."""
    return sorted(path.relative_to(CONFIG_DIR).with_suffix("").as_posix() for path in CONFIG_DIR.rglob("*.yml"))
