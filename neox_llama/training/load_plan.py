"""What a run starts from: nothing, a checkpoint to resume, or a base to fine-tune (fully, or with LoRA / Adapter /
Adapter v2).

The rules (docs/finetuning.md):

- ``load`` unset: train from scratch.
- ``finetune: true``: start from ``load``'s weights at step 0 with a fresh optimizer and new data. When ``save``
  (a directory other than ``load``'s) already holds a checkpoint of this fine-tune — its base fingerprint is
  ``load``'s — the run resumes from it instead, so re-running the same command continues it.
- ``finetune: false``: resume ``load`` exactly (step, optimizer, data position), at any layout: its layout-free
  optimizer state (``optimizer/``) and fp32 masters go into whatever engine this run builds. An adapter checkpoint
  (LoRA, Adapter, Adapter v2) resumes with its base found through its metadata; its settings must be the config's.
  A checkpoint saved before the optimizer state was layout-free (2026-12-07) resumes through DeepSpeed's own files
  at its own layout, and with its weights alone (a fresh optimizer) at another.

The plan also fixes the ZeRO stage the engine is built with (the validated config is never changed): the config's
``derived.engine_zero_stage``, except where a resumed checkpoint keeps its own (:func:`resume_zero_stage`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from neox_llama.checkpoint.adapter import base_ref, resolve_base
from neox_llama.checkpoint.metadata import BaseRef, Metadata, read_metadata
from neox_llama.checkpoint.paths import LATEST, METADATA, CheckpointError, has_optimizer_state, resolve_checkpoint
from neox_llama.config.schema import Config
from neox_llama.errors import TrainingError
from neox_llama.peft.methods import PeftSettings, describe, kind, peft_settings, same_shapes, settings_of

logger = logging.getLogger("train")


@dataclass
class LoadPlan:
    """Where this run's weights, adapters and training state come from, and the ZeRO stage its engine runs."""

    zero_stage: int = field(kw_only=True)
    """The ZeRO stage DeepSpeed runs: ``derived.engine_zero_stage``, or a resumed checkpoint's own
    (:func:`resume_zero_stage`)."""
    resume: Path | None = None
    """The checkpoint whose step, data position (and, at the same layout, optimizer) the run continues."""
    meta: Metadata | None = None
    """``resume``'s metadata (for a fine-tune from a base: the base's)."""
    same_layout: bool = False
    """Whether ``resume``'s DeepSpeed engine files (an older checkpoint's, sharded by layout) load as they are."""
    optimizer: Path | None = None
    """The checkpoint whose layout-free optimizer state (and fp32 masters) go into the engine, at any layout. Neither
    this nor ``same_layout``: the run continues from the weights alone with a fresh optimizer."""
    weights: Path | None = None
    """A full checkpoint whose weights fill the model before the engine exists (base, or ``resume`` saved at
    another layout)."""
    adapters: Path | None = None
    """An adapter checkpoint whose tensors are loaded (resuming a LoRA / Adapter run)."""
    base: BaseRef | None = None
    """The fine-tune's starting checkpoint, saved in every checkpoint of the run."""
    peft: PeftSettings | None = None
    """The parameter-efficient method the run trains with (None: every unfrozen weight)."""
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


def resume_zero_stage(meta: Metadata, cfg: Config) -> int:
    """The ZeRO stage a run resuming the checkpoint of ``meta`` builds its engine with: ``derived.engine_zero_stage``,
    except for a checkpoint that one fp32 rank saved at ZeRO 1 or 2 before such runs ran stage 0 (2026-12-03). It
    holds ZeRO's optimizer files, so the resume keeps the saved stage and its optimizer state loads as it is."""
    saved, runs = meta.layout, cfg.derived.engine_zero_stage
    if (saved.pipe_parallel_size, saved.model_parallel_size, saved.data_parallel_size, saved.world_size) != \
            (cfg.pipe_parallel_size, cfg.model_parallel_size, cfg.derived.data_parallel_size, cfg.derived.world_size):
        return runs
    if runs == 0 and saved.zero_stage == cfg.zero_optimization.stage in (1, 2):
        return saved.zero_stage
    return runs


def same_layout(meta: Metadata, cfg: Config, zero_stage: int) -> bool:
    """Whether DeepSpeed's own state of the checkpoint of ``meta`` (sharded by layout) loads as it is into an engine
    at ``cfg``'s layout running ``zero_stage``."""
    saved = meta.layout
    return (saved.pipe_parallel_size, saved.model_parallel_size, saved.data_parallel_size, saved.zero_stage) == \
        (cfg.pipe_parallel_size, cfg.model_parallel_size, cfg.derived.data_parallel_size, zero_stage)


def _resume_plan(folder: Path, meta: Metadata, cfg: Config, finetune: bool = False,
                 base: Path | None = None) -> LoadPlan:
    peft = peft_settings(cfg)
    layout_free = has_optimizer_state(folder)
    stage = cfg.derived.engine_zero_stage if layout_free else resume_zero_stage(meta, cfg)
    same = not layout_free and same_layout(meta, cfg, stage)
    optimizer = folder if layout_free else None
    notes = []
    if stage != cfg.derived.engine_zero_stage:
        notes.append(f"{folder} was saved by DeepSpeed at ZeRO stage {stage}: this run keeps that stage, so that its "
                     "optimizer state loads as it is")
    try:
        saved = settings_of(meta)
    except ValueError as err:
        raise TrainingError(f"{folder}: {err}") from None
    if cfg.preference_loss and meta.preference is None:
        if saved is not None:
            raise TrainingError(f"load {folder} is a {kind(saved)} checkpoint of instruction tuning: a preference run's "
                                "reference would be its adapters switched off, the base, not the tuned model; merge "
                                "it (tools/merge_lora.py) and start from the merged checkpoint with finetune: true")
        raise TrainingError(f"load {folder} is not a preference run to resume: start preference tuning from it with "
                            "finetune: true (its weights become the policy's start and the reference)")
    if saved is not None:
        if peft is None:
            keys = "lora_* keys" if kind(saved) == "LoRA" else "peft_method and adapter_* keys"
            raise TrainingError(f"{folder} is a {kind(saved)} checkpoint ({describe(saved)}); resume it with the same "
                                f"{keys}{_merge_hint(saved)}")
        if not same_shapes(saved, peft):
            raise TrainingError(f"{folder} was trained with {describe(saved)}, but the config says {describe(peft)}; "
                                "resume with the checkpoint's settings")
        if kind(saved) == "LoRA" and saved.dropout != peft.dropout:
            logger.warning("resuming %s with lora_dropout %g (it was trained with %g)", folder, peft.dropout,
                           saved.dropout)
        base_folder = resolve_base(folder, meta, base)
        return LoadPlan(resume=folder, meta=meta, same_layout=same, weights=base_folder, adapters=folder,
                        optimizer=optimizer, base=meta.base, peft=peft, zero_stage=stage, notes=notes)
    if peft is not None:
        if finetune:
            raise TrainingError(f"save holds {folder}, a full fine-tune of this base, but the config trains "
                                f"{describe(peft)}; choose another save directory for that run")
        keys = f"lora_r {peft.r}" if kind(peft) == "LoRA" else f"peft_method {peft.method}"
        raise TrainingError(f"{keys} with load {folder} (a full checkpoint) and finetune false: set "
                            f"finetune: true to start {kind(peft)} from it")
    return LoadPlan(resume=folder, meta=meta, same_layout=same, weights=None if same else folder,
                    optimizer=optimizer, base=meta.base, zero_stage=stage, notes=notes)


def plan_load(cfg: Config) -> LoadPlan:
    """The plan for ``cfg`` (every rank makes it from its own files; they must agree)."""
    peft, stage = peft_settings(cfg), cfg.derived.engine_zero_stage
    if not cfg.load:
        return LoadPlan(peft=peft, zero_stage=stage)
    try:
        folder = resolve_checkpoint(cfg.load)
    except CheckpointError as err:
        if cfg.finetune or Path(cfg.load).joinpath(LATEST).exists() or Path(cfg.load, METADATA).exists():
            raise TrainingError(str(err)) from None
        logger.info("no checkpoint in %s yet: starting from scratch", cfg.load)
        return LoadPlan(peft=peft, zero_stage=stage)
    meta = read_metadata(folder)
    if not cfg.finetune:
        return _resume_plan(folder, meta, cfg)
    if meta.is_adapter:
        raise TrainingError(f"load {folder} is a {kind(settings_of(meta))} checkpoint: to continue it set finetune: "
                            f"false{_merge_hint(settings_of(meta))}")
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
            plan = _resume_plan(saved_folder, saved_meta, cfg, finetune=True, base=folder)
            plan.notes.insert(0, f"{cfg.save} holds {saved_folder.name} of this fine-tune of {folder}: resuming it")
            return plan
    return LoadPlan(weights=folder, base=base, peft=peft, meta=meta, zero_stage=stage)


def _merge_hint(settings: PeftSettings) -> str:
    """How to go on from an adapter checkpoint as a plain model, where its method allows it."""
    if kind(settings) == "LoRA":
        return "; or merge it (tools/merge_lora.py) and load the merged checkpoint"
    if kind(settings) == "Adapter v2":
        return ("; its learned prompt cannot be merged (tools/merge_lora.py --partial merges the rest and drops the "
                "prompt)")
    return "; an Adapter checkpoint (a learned prompt) cannot be merged into plain weights"


def _save_dir(path: str | Path) -> Path:
    """The save directory a checkpoint path belongs to (itself, or the parent of a checkpoint folder)."""
    path = Path(path).resolve()
    return path.parent if (path / METADATA).is_file() else path
