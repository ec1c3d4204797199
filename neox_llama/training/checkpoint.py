"""Checkpoints: ``{save}/global_step{N}/`` holding

- DeepSpeed's engine state (model, optimizer, LR schedule) for exact resumption at the same layout,
- ``weights/layer_XXX.safetensors``: every layer's full (un-sharded) tensors under their stable names,
  so any pipeline / tensor / data-parallel layout, fine-tuning and export can load them,
- ``rng/rank_R.pt``: every rank's random states,
- ``config.yml`` (the merged config), the tokenizer file(s), and ``metadata.json`` (step, data position, layout).

``{save}/latest`` names the newest complete checkpoint; it is written last, atomically, after every rank
has finished, so it never names a partial one.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from neox_llama.config.loading import dump_raw
from neox_llama.config.schema import Config
from neox_llama.model.init import shard
from neox_llama.parallel.pipeline import rank_layers
from neox_llama.parallel.topology import ParallelState
from neox_llama.utils.files import atomic_write_text

logger = logging.getLogger("train")

LATEST = "latest"
METADATA = "metadata.json"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A path is not a (complete) checkpoint, or its contents do not fit the model; the message says which."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for ``path``: a save directory (through ``latest``) or one ``global_stepN`` folder."""
    path = Path(path)
    if (path / METADATA).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        folder = path / tag
        if not (folder / METADATA).is_file():
            raise CheckpointError(f"{latest} names {tag}, but {folder} is not a complete checkpoint (no {METADATA})")
        return folder
    if path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (no {METADATA}) and not a save directory (no {LATEST} file)")
    raise CheckpointError(f"{path}: checkpoint directory not found")


def read_metadata(folder: Path) -> dict:
    try:
        meta = json.loads((folder / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / METADATA}: unreadable ({err})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / METADATA}: format {meta.get('format')}, expected {FORMAT_VERSION}")
    return meta


@torch.no_grad()
def _full_tensor(param: torch.Tensor, state: ParallelState) -> torch.Tensor:
    dim = getattr(param, "partition_dim", None)
    tensor = param.detach()
    if dim is None or state.tp_size == 1:
        return tensor.cpu().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(state.tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=dim).cpu().contiguous()


def save_layer_weights(module: torch.nn.Module, state: ParallelState, folder: Path) -> None:
    """Write this stage's layers as full tensors (tensor-parallel ranks gather; one rank per stage writes)."""
    writer = state.dp_rank == 0 and state.tp_rank == 0
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    for index, layer in rank_layers(module, state).items():
        if index == 0 and state.pp_rank != 0:
            continue  # the tied embedding's copy on the last stage: the first stage writes layer 0
        tensors = {name: _full_tensor(p, state) for name, p in layer.named_parameters()}
        if writer and tensors:
            save_file(tensors, str(folder / "weights" / f"layer_{index:03d}.safetensors"))


@torch.no_grad()
def load_layer_weights(module: torch.nn.Module, state: ParallelState, folder: Path) -> None:
    """Fill this rank's layers from ``weights/`` (cut to its tensor-parallel shard), whatever layout wrote them."""
    for index, layer in rank_layers(module, state).items():
        path = folder / "weights" / f"layer_{index:03d}.safetensors"
        params = dict(layer.named_parameters())
        if not params:
            continue
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint has no weights for layer {index})")
        tensors = load_file(str(path))
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise CheckpointError(f"{path}: no tensor for {', '.join(missing)}")
        for name, param in params.items():
            full = tensors[name]
            expected = tuple(param.shape)
            piece = shard(full, param)
            if tuple(piece.shape) != expected:
                raise CheckpointError(f"{path}: {name} has shape {tuple(full.shape)}, which does not fit the model "
                                      f"(this rank holds {expected}); the checkpoint is of a different model")
            param.copy_(piece.to(param.dtype))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainingState:
    """What resuming needs besides the engine: the step, the data position, and bookkeeping."""

    step: int = 0
    consumed_samples: int = 0
    consumed_valid_samples: int = 0
    best_valid_loss: float | None = None
    evaluations_without_improvement: int = 0


def save_checkpoint(engine, module_state: ParallelState, cfg: Config, train: TrainingState,
                    tokenizer_files: list[Path], tag: str | None = None) -> Path:
    """Save everything needed to resume; returns the folder. Every rank must call this."""
    save = Path(cfg.save)
    tag = tag or tag_for(train.step)
    folder = save / tag
    rank = dist.get_rank()
    if rank == 0 and (folder / METADATA).exists():
        (folder / METADATA).unlink()  # re-saving the same tag: it is incomplete until metadata is rewritten
    dist.barrier()
    engine.save_checkpoint(str(save), tag=tag, save_latest=False)
    save_layer_weights(engine.module, module_state, folder)
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), folder / "rng" / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        dump_raw(cfg.raw, folder / "config.yml", header=f"# the merged config of the run that saved {tag}")
        for file in tokenizer_files:
            shutil.copyfile(file, folder / file.name)
        meta = {
            "format": FORMAT_VERSION, "tag": tag, "step": train.step, "consumed_samples": train.consumed_samples,
            "consumed_valid_samples": train.consumed_valid_samples, "best_valid_loss": train.best_valid_loss,
            "evaluations_without_improvement": train.evaluations_without_improvement,
            "layout": {"pipe_parallel_size": cfg.pipe_parallel_size, "model_parallel_size": cfg.model_parallel_size,
                       "data_parallel_size": cfg.derived.data_parallel_size,
                       "zero_stage": cfg.zero_optimization.stage, "world_size": cfg.derived.world_size},
            "tokenizer_files": [f.name for f in tokenizer_files], "precision": cfg.precision,
            "lora": bool(cfg.lora_r),
        }
        atomic_write_text(folder / METADATA, json.dumps(meta, indent=2))
        if tag.startswith("global_step"):
            atomic_write_text(save / LATEST, tag)
            _prune(save, cfg.keep_last_n_checkpoints, keep=tag)
    dist.barrier()
    logger.info("saved checkpoint %s", folder)
    return folder


def _prune(save: Path, keep_last: int | None, keep: str) -> None:
    steps = sorted((int(m.group(1)), p) for p in save.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"global_step(\d+)", p.name)))
    complete = [(s, p) for s, p in steps if (p / METADATA).exists()]
    for _, path in steps:  # folders left incomplete by an interrupted save
        if not (path / METADATA).exists() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    if keep_last:
        for _, path in complete[:-keep_last]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)


def same_layout(meta: dict, cfg: Config) -> bool:
    """Whether DeepSpeed's own state (sharded by layout) can be loaded as it is."""
    layout = meta["layout"]
    return (layout["pipe_parallel_size"], layout["model_parallel_size"], layout["data_parallel_size"],
            layout["zero_stage"]) == (cfg.pipe_parallel_size, cfg.model_parallel_size,
                                      cfg.derived.data_parallel_size, cfg.zero_optimization.stage)


def restore_engine_state(engine, folder: Path) -> None:
    """Load DeepSpeed's model, optimizer and schedule state (same layout only)."""
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no engine state to load")


def restore_rng(folder: Path, rank: int) -> bool:
    path = folder / "rng" / f"rank_{rank}.pt"
    if not path.is_file():
        return False
    _set_rng_state(torch.load(path, weights_only=False))
    return True


def training_state(meta: dict) -> TrainingState:
    return TrainingState(step=meta["step"], consumed_samples=meta["consumed_samples"],
                         consumed_valid_samples=meta.get("consumed_valid_samples", 0),
                         best_valid_loss=meta.get("best_valid_loss"),
                         evaluations_without_improvement=meta.get("evaluations_without_improvement", 0))
