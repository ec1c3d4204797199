"""Adapter checkpoints (LoRA, Adapter, Adapter v2): trained tensors beside a reference to their base, and the base
found again from them.

A LoRA run's ``global_stepN/`` holds ``adapter/layer_XXX.safetensors`` (each layer's full, layout-free
``{path}.lora.a`` / ``{path}.lora.b``; an Adapter run's prompts, gates, scales, biases and norms), no ``weights/``,
and in ``metadata.json`` every setting (``lora`` or ``adapter``), the prompt style and the base (``base``: its folder and fingerprint). The fingerprint is a hash of
the base's ``metadata.json`` and of every weight file's name and safetensors header (names, dtypes, shapes,
offsets) — cheap at any size, and different for any other checkpoint, though not a hash of the values.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import torch

from neox_llama.checkpoint.metadata import BaseRef, Metadata, read_metadata
from neox_llama.checkpoint.paths import METADATA, WEIGHTS, CheckpointError, resolve_checkpoint
from neox_llama.checkpoint.weights import read_layer_file

ADAPTER = "adapter"
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")


def adapter_file(folder: Path, index: int) -> Path:
    """The adapter tensors of global layer ``index``."""
    return Path(folder) / ADAPTER / f"layer_{index:03d}.safetensors"


def fingerprint(folder: str | Path) -> str:
    """sha256 over ``metadata.json`` and each weight file's name and safetensors header."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / METADATA).read_bytes())
    weights = folder / WEIGHTS
    files = sorted(weights.glob("layer_*.safetensors")) if weights.is_dir() else []
    for path in files:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated weight file (no safetensors header)")
            (size,) = struct.unpack("<Q", head)
            digest.update(path.name.encode() + head + handle.read(min(size, 100_000_000)))
    return digest.hexdigest()


def base_ref(folder: str | Path) -> BaseRef:
    """The reference a fine-tune of checkpoint ``folder`` saves (absolute folder + fingerprint)."""
    folder = resolve_checkpoint(folder).resolve()
    return BaseRef(str(folder), fingerprint(folder))


def resolve_base(adapter_folder: Path, meta: Metadata, override: str | Path | None = None,
                 force: bool = False) -> Path:
    """The base checkpoint folder of an adapter checkpoint: ``override`` when given, else the path it saved.

    The base's fingerprint must equal the saved one (``force`` accepts a different one; shapes are still checked
    when the tensors are read).
    """
    if meta.base is None:
        raise CheckpointError(f"{adapter_folder / METADATA}: an adapter checkpoint without a base reference")
    candidate = Path(override) if override is not None else Path(meta.base.path)
    try:
        folder = resolve_checkpoint(candidate)
    except CheckpointError as err:
        hint = "" if override is not None else (" (the base moved? merge_lora.py, generate.py and convert_to_hf.py "
                                                "take its new place with --base; resuming training needs it back at "
                                                "the saved path)")
        raise CheckpointError(f"the base of the adapter checkpoint {adapter_folder}: {err}{hint}") from None
    if read_metadata(folder).is_adapter:
        raise CheckpointError(f"{folder}: is itself an adapter checkpoint; the base must be a full checkpoint")
    found = fingerprint(folder)
    if found != meta.base.fingerprint and not force:
        raise CheckpointError(f"{folder}: its fingerprint {found[:12]} differs from the one the adapter checkpoint "
                              f"{adapter_folder} was trained on ({meta.base.fingerprint[:12]}, {meta.base.path}); "
                              "it is another checkpoint (merge_lora.py --force uses it anyway)")
    return folder


def adapter_layers(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every trained tensor of an adapter checkpoint: global layer index -> {``path.lora.a``: tensor, ...}."""
    directory = Path(folder) / ADAPTER
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing (an adapter checkpoint keeps its tensors there)")
    indices = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _LAYER_FILE.fullmatch(p.name)))
    if not indices:
        raise CheckpointError(f"{directory}: holds no adapter files")
    return {i: read_layer_file(adapter_file(folder, i)) for i in indices}


def updates_by_weight(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, tuple]:
    """One layer's adapter tensors as ``{weight name: (A, B, scale)}`` (e.g. ``attention.query.weight``)."""
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora.a"):
            path = name[: -len(".lora.a")]
            b = tensors.get(f"{path}.lora.b")
            if b is None:
                raise CheckpointError(f"adapter tensor {path}.lora.b is missing beside {name}")
            out[f"{path}.weight"] = (a, b, scale)
    return out


@torch.no_grad()
def fill_adapters(layers: dict[int, torch.nn.Module], folder: Path, settings) -> None:
    """Copy an adapter checkpoint's tensors into ``layers`` (global index -> module; the method of ``settings``,
    a PeftSettings, attached), each cut to this rank's tensor-parallel shard; every trained tensor must find its
    values with their full shapes, and no file of these layers may hold tensors the model does not train."""
    from neox_llama.model.factory import full_shape, shard
    from neox_llama.peft.methods import trained_tensors

    for index, layer in layers.items():
        params = trained_tensors(layer, settings)
        path = adapter_file(folder, index)
        if not params:
            if path.is_file():
                raise CheckpointError(f"{path}: adapter tensors for layer {index}, which this run does not adapt "
                                      "(the adapter settings differ from the checkpoint's)")
            continue
        tensors = read_layer_file(path)
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or extra:
            what = f"no tensor for {', '.join(missing)}" if missing else f"tensor {', '.join(extra)} has no adapter"
            raise CheckpointError(f"{path}: {what}; the adapter settings differ from the checkpoint's")
        for name, param in params.items():
            if tuple(tensors[name].shape) != full_shape(param):
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the adapter expects "
                                      f"{full_shape(param)}; the adapter settings or the model differ from the checkpoint's")
            param.copy_(shard(tensors[name], param).to(param.dtype))
