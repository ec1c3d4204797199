"""What a run starts from: nothing, a checkpoint to resume, or a base to fine-tune (fully or with LoRA).

The rules (docs/finetuning.md):

- ``load`` unset: train from scratch.
- ``finetune: true``: start from ``load``'s weights at step 0 with a fresh optimizer and new data. When ``save``
  (a directory other than ``load``'s) already holds a checkpoint of this fine-tune — its base fingerprint is
  ``load``'s — the run resumes from it instead, so re-running the same command continues it.
- ``finetune: false``: resume ``load`` exactly (step, optimizer, data position). A LoRA checkpoint resumes with
  its base found through its metadata; its LoRA settings must be the config's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from neox_llama.checkpoint.adapter import base_ref, resolve_base
from neox_llama.checkpoint.metadata import BaseRef, Metadata, read_metadata
from neox_llama.checkpoint.paths import LATEST, METADATA, CheckpointError, resolve_checkpoint
from neox_llama.config.schema import Config
from neox_llama.errors import TrainingError
from neox_llama.model.lora import LoraSettings

logger = logging.getLogger("train")


@dataclass
class LoadPlan:
    """Where this run's weights, adapters and training state come from."""

    resume: Path | None = None
    """The checkpoint whose step, data position (and, at the same layout, optimizer) the run continues."""
    meta: Metadata | None = None
    """``resume``'s metadata."""
    weights: Path | None = None
    """A full checkpoint whose weights fill the model before the engine exists (base, or another layout)."""
    adapters: Path | None = None
    """A LoRA checkpoint whose adapters are loaded (resuming a LoRA run)."""
    base: BaseRef | None = None
    """The fine-tune's starting checkpoint, saved in every checkpoint of the run."""
    lora: LoraSettings | None = None
    notes: list[str] = field(default_factory=list)


def _complete(path: str | Path) -> tuple[Path, Metadata] | None:
    """The checkpoint ``path`` holds, None when it holds none yet; a damaged one (``latest`` naming an incomplete
    folder) is an error, so a fine-tune never silently starts over on top of it."""
    try:
        folder = resolve_checkpoint(path)
    except CheckpointError as err:
        if Path(path, LATEST).exists() or Path(path, METADATA).exists():
            raise TrainingError(f"save: {err}") from None
        return None
    return folder, read_metadata(folder)


def _same_lora(saved: LoraSettings, lora: LoraSettings) -> bool:
    """Whether the config's LoRA fits the checkpoint's (targets in any order; dropout may change)."""
    return (saved.r, saved.alpha, sorted(saved.targets)) == (lora.r, lora.alpha, sorted(lora.targets))


def _resume_plan(folder: Path, meta: Metadata, lora: LoraSettings | None, finetune: bool = False,
                 base: Path | None = None) -> LoadPlan:
    if meta.is_adapter:
        saved = LoraSettings.from_dict(meta.lora)
        if lora is None:
            raise TrainingError(f"{folder} is a LoRA checkpoint (r {saved.r}, alpha {saved.alpha:g}, targets "
                                f"{', '.join(saved.targets)}); resume it with the same lora_* keys, or merge it "
                                "(tools/merge_lora.py) and load the merged checkpoint")
        if not _same_lora(saved, lora):
            raise TrainingError(f"{folder} was trained with LoRA {saved.to_dict()}, but the config says "
                                f"{lora.to_dict()}; resume with the checkpoint's r, alpha and targets")
        if saved.dropout != lora.dropout:
            logger.warning("resuming %s with lora_dropout %g (it was trained with %g)", folder, lora.dropout,
                           saved.dropout)
        base_folder = resolve_base(folder, meta, base)
        return LoadPlan(resume=folder, meta=meta, weights=base_folder, adapters=folder, base=meta.base, lora=lora)
    if lora is not None:
        if finetune:
            raise TrainingError(f"save holds {folder}, a full fine-tune of this base, but the config sets lora_r "
                                f"{lora.r}; choose another save directory for a LoRA run")
        raise TrainingError(f"lora_r {lora.r} with load {folder} (a full checkpoint) and finetune false: set "
                            "finetune: true to start LoRA from it")
    return LoadPlan(resume=folder, meta=meta, base=meta.base)


def plan_load(cfg: Config) -> LoadPlan:
    """The plan for ``cfg`` (every rank makes it from its own files; they must agree)."""
    lora = LoraSettings.from_config(cfg)
    if not cfg.load:
        return LoadPlan(lora=lora)
    try:
        folder = resolve_checkpoint(cfg.load)
    except CheckpointError as err:
        if cfg.finetune or Path(cfg.load).joinpath(LATEST).exists() or Path(cfg.load, METADATA).exists():
            raise TrainingError(str(err)) from None
        logger.info("no checkpoint in %s yet: starting from scratch", cfg.load)
        return LoadPlan(lora=lora)
    meta = read_metadata(folder)
    if not cfg.finetune:
        return _resume_plan(folder, meta, lora)
    if meta.is_adapter:
        raise TrainingError(f"load {folder} is a LoRA checkpoint: to continue it set finetune: false; to fine-tune "
                            "further from it, merge it first (tools/merge_lora.py) and load the merged checkpoint")
    base = base_ref(folder)
    if cfg.save and _save_dir(cfg.save) == _save_dir(folder):
        raise TrainingError(f"save {cfg.save} is the directory of the checkpoint being fine-tuned ({folder}): the "
                            "fine-tune's global_stepN and latest would overwrite or prune it; choose another save")
    if cfg.save:
        saved = _complete(cfg.save)
        if saved is not None:
            saved_folder, saved_meta = saved
            if saved_meta.base is None or saved_meta.base.fingerprint != base.fingerprint:
                raise TrainingError(f"save {cfg.save} already holds {saved_folder}, which is not a fine-tune of "
                                    f"{folder}; choose another save directory (or remove it) so nothing is overwritten")
            plan = _resume_plan(saved_folder, saved_meta, lora, finetune=True, base=folder)
            plan.notes.append(f"{cfg.save} holds {saved_folder.name} of this fine-tune of {folder}: resuming it")
            return plan
    return LoadPlan(weights=folder, base=base, lora=lora, meta=meta)


def _save_dir(path: str | Path) -> Path:
    """The save directory a checkpoint path belongs to (itself, or the parent of a checkpoint folder)."""
    path = Path(path).resolve()
    return path.parent if (path / METADATA).is_file() else path
