"""Finding a checkpoint folder: a save directory (through ``latest``), ``global_stepN``, or ``best``."""

from __future__ import annotations

from pathlib import Path

from neox_llama.errors import NeoxLlamaError

LATEST = "latest"
METADATA = "metadata.json"
BEST = "best"
WEIGHTS = "weights"
OPTIMIZER = "optimizer"
"""The layout-free optimizer state: one file of moments per layer, and ``state.json`` (steps, loss scale)."""
OPTIMIZER_STATE = "state.json"


class CheckpointError(NeoxLlamaError):
    """A path is not a (complete) checkpoint, or its contents do not fit the model; the message says which."""


def tag_for(step: int) -> str:
    """The folder name of the checkpoint saved after ``step`` optimizer steps."""
    return f"global_step{step}"


def is_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is one complete checkpoint (its metadata is written last)."""
    return (Path(folder) / METADATA).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for ``path``: one checkpoint folder, or a save directory (through ``latest``).

    ``SAVE/best`` and ``SAVE/global_stepN`` are checkpoint folders themselves.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        folder = path / tag
        if not tag or not is_checkpoint(folder):
            found = complete_checkpoints(path)
            what = f"{latest} is empty" if not tag else \
                f"{latest} names {tag}, but {folder} is not a complete checkpoint (no {METADATA})"
            newest = next((name for name in reversed(found) if name != BEST), found[-1]) if found else ""
            there = f"the complete checkpoints in {path}: {', '.join(found)}; write one of them into {latest}, or " \
                f"load one directly (e.g. {path / newest})" if found else f"{path} holds no complete checkpoint"
            raise CheckpointError(f"{what}; {there}")
        return folder
    if path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (no {METADATA}) and not a save directory (no {LATEST} file)")
    raise CheckpointError(f"{path}: checkpoint directory not found")


def complete_checkpoints(save: str | Path) -> list[str]:
    """The complete checkpoint folders in a save directory: ``global_stepN`` by step, then ``best``."""
    save = Path(save)
    steps = sorted((int(p.name.removeprefix("global_step")), p.name) for p in save.glob("global_step*")
                   if p.name.removeprefix("global_step").isdigit() and is_checkpoint(p))
    return [name for _, name in steps] + ([BEST] if is_checkpoint(save / BEST) else [])


def layer_file(folder: Path, index: int) -> Path:
    """The layout-free weight file of global layer ``index``."""
    return folder / WEIGHTS / f"layer_{index:03d}.safetensors"


def optimizer_file(folder: Path, index: int) -> Path:
    """The layout-free optimizer state (e.g. Adam's moments) of global layer ``index``'s trained tensors."""
    return Path(folder) / OPTIMIZER / f"layer_{index:03d}.safetensors"


def has_optimizer_state(folder: Path) -> bool:
    """Whether the checkpoint carries its optimizer state layout-free (saved since 2026-12-07)."""
    return (Path(folder) / OPTIMIZER / OPTIMIZER_STATE).is_file()
