"""Layout-free weight files: ``weights/layer_XXX.safetensors``, read and written one layer at a time.

Every reader checks names and shapes, so a checkpoint of another model is one clear error naming the
file, the tensor and both shapes, never a ``KeyError`` or a silent partial load; and every tensor as it is read
(:func:`check_finite`), so NaN or Inf weights are one error naming the file and the tensor, never a model that
answers ``loss nan``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from neox_llama.checkpoint.paths import WEIGHTS, CheckpointError, layer_file
from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import full_shape, shard
from neox_llama.model.llama import build_model
from neox_llama.utils.files import default_file_mode

_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")

DAMAGED = "the checkpoint is damaged or was saved from a diverged run; use another one (e.g. an earlier global_stepN)"


def check_finite(tensor: torch.Tensor, path: Path | str, name: str, advice: str = DAMAGED) -> torch.Tensor:
    """``tensor`` unchanged if every value is finite, else a :class:`CheckpointError` naming ``path`` and ``name``.

    The one finiteness check of every reader (layer files, adapters, merges, the Hugging Face import and export),
    run on each tensor right after it is read, one layer at a time: no second pass over the model. The NaN and Inf
    counts are taken only when the check fails.
    """
    if not _all_finite(tensor):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise CheckpointError(f"{path}: tensor {name} holds non-finite values ({nan} NaN, {inf} Inf of "
                              f"{tensor.numel()}); {advice}")
    return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    # A sum that meets a NaN or an Inf is NaN or Inf, so a finite sum proves every value finite in one pass that
    # allocates nothing (torch.isfinite(t).all() builds the tensor's absolute values and two masks: 15x slower, and
    # twice the largest tensor of memory). Only a non-finite sum (a bad value, or finite values whose sum overflows)
    # takes the exact check. The sum is float32 even for fp16 tensors, whose own sum overflows past 65504.
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def read_layer_file(path: Path, what: str = "weight") -> dict[str, torch.Tensor]:
    """All tensors of one layer file (``what``: weight, optimizer state); a missing, truncated or corrupt file, or a
    non-finite tensor, is an error naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint has no {what} file for this layer)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: unreadable {what} file ({err}); the checkpoint is damaged, "
                              "use another one (e.g. an earlier global_stepN)") from None
    for name, tensor in tensors.items():
        check_finite(tensor, path, name)
    return tensors


def write_layer_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one layer file through a temporary name, so a reader never sees half of it; a failed write is an
    ``OSError`` (safetensors' own error converted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    except SafetensorError as err:  # e.g. a full disk: an OSError for callers, like every other write failure
        if tmp.is_file():
            tmp.unlink()
        raise OSError(str(err)) from None
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())  # on disk before metadata.json (written last, also fsynced) says complete
    tmp.chmod(default_file_mode())  # safetensors creates 0600 files
    os.replace(tmp, path)


def layer_indices(folder: Path) -> list[int]:
    """The global layer indices that have weight files in ``folder``."""
    weights = folder / WEIGHTS
    if not weights.is_dir():
        raise CheckpointError(f"{weights}: missing (not a neox_llama checkpoint, or an incomplete one)")
    return sorted(int(m.group(1)) for p in weights.iterdir() if (m := _LAYER_FILE.fullmatch(p.name)))


def read_full_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor under its neox_llama name ``{layer}.{name}`` (the whole model: for export and tools)."""
    state: dict[str, torch.Tensor] = {}
    for index in layer_indices(folder):
        for name, tensor in read_layer_file(layer_file(folder, index)).items():
            state[f"{index}.{name}"] = tensor
    return state


def _check_names(params: dict, names: set[str], path: Path) -> None:
    missing = sorted(set(params) - names)
    if missing:
        raise CheckpointError(f"{path}: no tensor for {', '.join(missing)}; the checkpoint is of a different model")
    extra = sorted(names - set(params))
    if extra:
        raise CheckpointError(f"{path}: tensor {', '.join(extra)} has no place in the model; the checkpoint is of a "
                              "different model (biases, tying or layer kinds differ)")


def is_reward_checkpoint(folder: Path) -> bool:
    """Whether the checkpoint in ``folder`` is a reward model (its config.yml: ``reward_head`` or
    ``preference_loss: rm``): its score head must then be read, never started fresh."""
    import yaml

    try:
        raw = yaml.safe_load((Path(folder) / "config.yml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False  # no readable config: the loader's own checks report it
    return bool(raw.get("reward_head")) or raw.get("preference_loss") == "rm"


def starts_fresh(layer: nn.Module, path: Path) -> bool:
    """Whether ``layer`` is a reward model's score head whose file is a language model's (a vocabulary head, or none
    for a tied one): a reward model fine-tuned from a language model keeps its freshly initialised score head, as
    ``AutoModelForSequenceClassification`` does from a causal LM."""
    if not hasattr(layer, "score"):
        return False
    if not path.is_file():
        return True
    try:
        with safe_open(str(path), framework="pt") as handle:
            return "score.weight" not in set(handle.keys())
    except (SafetensorError, OSError):
        return False  # unreadable: the reader says so


@torch.no_grad()
def fill_layer_from_file(layer: nn.Module, path: Path) -> None:
    """Fill ``layer`` from its layout-free file reading only this rank's tensor-parallel slice of each tensor
    (safetensors reads a slice without the rest), so a rank never holds another rank's part of the layer; each slice
    is checked for NaN and Inf as it is read."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint has no weights for this layer)")
    params = dict(layer.named_parameters())
    try:
        with safe_open(str(path), framework="pt") as handle:
            _check_names(params, set(handle.keys()), path)
            for name, param in params.items():
                part = handle.get_slice(name)
                shape, expected = tuple(part.get_shape()), full_shape(param)
                if shape != expected:
                    raise CheckpointError(f"{path}: {name} has shape {shape}, the model expects {expected}; the "
                                          "checkpoint is of a different model")
                dim = getattr(param, "partition_dim", None)
                index = [slice(None)] * len(shape)
                if dim is not None and getattr(param, "tp_size", 1) > 1:
                    size = shape[dim] // param.tp_size
                    index[dim] = slice(param.tp_rank * size, (param.tp_rank + 1) * size)
                param.copy_(check_finite(part[tuple(index)], path, name).to(param.dtype))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable weight file ({err}); the checkpoint is damaged, "
                              "use another one (e.g. an earlier global_stepN)") from None


@torch.no_grad()
def fill_layer(layer: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``tensors`` (full, layout-free) into ``layer``, each cut to this rank's tensor-parallel shard.

    Every parameter must be present with its full shape, and no tensor may be left over.
    """
    params = dict(layer.named_parameters())
    _check_names(params, set(tensors), path)
    for name, param in params.items():
        full = tensors[name]
        expected = full_shape(param)
        if tuple(full.shape) != expected:
            raise CheckpointError(f"{path}: {name} has shape {tuple(full.shape)}, the model expects {expected}; "
                                  "the checkpoint is of a different model")
        param.copy_(shard(full, param).to(param.dtype))


def check_shapes(folder: Path, args: LlamaArgs, only: set[int] | None = None, fresh_score: bool = False) -> None:
    """Every tensor of ``folder``'s weight files has the full shape a model with ``args`` expects, and no tensor
    or file is missing or left over. Reads only the safetensors headers (fast, whatever the model size).
    ``only``: check just these global layer indices (one rank's pipeline stage); ``fresh_score``: a reward model's
    score head may start fresh over a language model's head (:func:`starts_fresh`)."""
    model = build_model(args, device="meta", initialize=False)
    expected = {int(i): layer for i, layer in model.named_children() if next(layer.parameters(), None) is not None}
    extra = sorted(set(layer_indices(folder)) - set(expected)) if only is None else []
    if only is not None:
        expected = {i: layer for i, layer in expected.items() if i in only}
    if extra:
        raise CheckpointError(f"{layer_file(folder, extra[0])}: the model has no layer {extra[0]} with weights "
                              "(it has fewer layers, or ties its head to the embedding); the checkpoint is of a "
                              "different model")
    for index, layer in expected.items():
        path = layer_file(folder, index)
        if fresh_score and starts_fresh(layer, path):
            continue
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint has no weights for layer {index})")
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable weight file ({err}); the checkpoint is damaged") from None
        params = dict(layer.named_parameters())
        missing = sorted(set(params) - set(shapes))
        if missing:
            raise CheckpointError(f"{path}: no tensor for {', '.join(missing)}; the checkpoint is of a different model")
        for name, param in params.items():
            if shapes[name] != tuple(param.shape):
                raise CheckpointError(f"{path}: {name} has shape {shapes[name]}, the model expects "
                                      f"{tuple(param.shape)}; the checkpoint is of a different model (its config.yml "
                                      "differs from this run's)")


def layers_with_weights(args: LlamaArgs) -> set[int]:
    """The global indices of the layers of a model with ``args`` that own parameters (a tied head owns none)."""
    model = build_model(args, device="meta", initialize=False)
    return {int(i) for i, layer in model.named_children() if next(layer.parameters(), None) is not None}


def fill_layers(layers: dict[int, nn.Module], folder: Path, expected: set[int] | None = None,
                fresh_score: bool = False) -> None:
    """Fill every layer (global index -> module) that has parameters from ``folder``'s weight files.

    ``expected`` (the indices of the whole model's layers with weights) also refuses weight files the model
    has no layer for, e.g. an untied head loaded into a tied model, which would otherwise be dropped silently.
    ``fresh_score`` (a reward model fine-tuned from a language model): its score head keeps its initial values where
    the file holds a vocabulary head (:func:`starts_fresh`); elsewhere a missing score head is an error.
    """
    if expected is not None:
        extra = sorted(set(layer_indices(folder)) - expected)
        if extra:
            raise CheckpointError(f"{layer_file(folder, extra[0])}: the model has no layer {extra[0]} with weights "
                                  "(it has fewer layers, or ties its head to the embedding); the checkpoint is of a "
                                  "different model")
    for index, layer in layers.items():
        if next(layer.parameters(), None) is None:
            continue  # e.g. a tied head, which reuses the embedding's weight
        if fresh_score and starts_fresh(layer, layer_file(folder, index)):
            continue  # a reward model's score head over a language model's checkpoint: as initialised
        fill_layer_from_file(layer, layer_file(folder, index))
