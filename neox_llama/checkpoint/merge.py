"""Merging LoRA checkpoints into their base, one layer at a time: ``W + sum_i weight_i x (alpha_i / r_i) B_i A_i``.

The same streaming merge serves ``tools/merge_lora.py`` (written as a full checkpoint), generation with
``--adapter`` and the Hugging Face export of a LoRA checkpoint, through :func:`merged_weight`, so all of them
compute the same tensors to the bit. Peak memory is about one layer of the base, never the whole model. A weight
must be finite and within ``MAX_WEIGHT`` (``force`` goes beyond), and every merged tensor must come out finite.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from neox_llama.checkpoint.adapter import adapter_layers, fingerprint, resolve_base, updates_by_weight
from neox_llama.checkpoint.metadata import Layout, Metadata, read_metadata, write_metadata
from neox_llama.checkpoint.paths import CheckpointError, layer_file, resolve_checkpoint
from neox_llama.checkpoint.weights import check_finite, layer_indices, read_layer_file, write_layer_file
from neox_llama.peft.lora import LoraSettings, merged_weight
from neox_llama.peft.methods import PeftSettings, kind, settings_of
from neox_llama.utils.files import building_dir, output_dir_problem

logger = logging.getLogger(__name__)

PEFT_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "peft_method", "adapter_prompt_length",
             "adapter_start_layer", "adapter_gate")
"""Config keys a merged checkpoint drops: it is a plain model."""
MAX_WEIGHT = 10.0
"""The largest ``|weight|`` of a LoRA update merged without ``force`` (1 is the update as trained)."""


def check_weight(weight: float, source: str | Path, force: bool = False) -> None:
    """Refuse a merge weight that is not a finite number, or (unless ``force``) one beyond ``MAX_WEIGHT``; ``source``
    names the adapter checkpoint it scales. Checked before anything is read or written."""
    if not math.isfinite(weight):
        raise CheckpointError(f"--weight {weight:g} for {source}: not a finite number; give the scale of the "
                              f"adapter's update, between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g} (1 = as trained)")
    if abs(weight) > MAX_WEIGHT and not force:
        raise CheckpointError(f"--weight {weight:g} for {source}: outside -{MAX_WEIGHT:g}..{MAX_WEIGHT:g} (1 = the "
                              "update as trained); pass --force to merge so large a weight anyway")


@dataclass
class Adapter:
    """An adapter checkpoint to apply (LoRA, Adapter or Adapter v2): its folder, metadata, settings and the weight
    of its update (LoRA only)."""

    folder: Path
    metadata: Metadata
    settings: PeftSettings
    weight: float = 1.0

    @classmethod
    def open(cls, path: str | Path, weight: float = 1.0) -> Adapter:
        folder = resolve_checkpoint(path)
        meta = read_metadata(folder)
        try:
            settings = settings_of(meta)
        except ValueError as err:
            raise CheckpointError(f"{folder}: {err}") from None
        if settings is None:
            raise CheckpointError(f"{folder}: not an adapter checkpoint (its metadata.json has no lora or adapter "
                                  "settings)")
        return cls(folder, meta, settings, weight)

    @property
    def is_lora(self) -> bool:
        return isinstance(self.settings, LoraSettings)


def find_base(adapters: list[Adapter], base: str | Path | None = None, force: bool = False) -> Path:
    """The base every adapter was trained on (``base`` overrides the saved path); all must share it."""
    folder = resolve_base(adapters[0].folder, adapters[0].metadata, base, force)
    for adapter in adapters[1:]:
        resolve_base(adapter.folder, adapter.metadata, folder, force)  # same base, same fingerprint
    return folder


def merged_layer(index: int, tensors: dict[str, torch.Tensor], adapters: list[Adapter],
                 layers: list[dict[int, dict[str, torch.Tensor]]], path: Path) -> dict[str, torch.Tensor]:
    """Layer ``index``'s base ``tensors`` with every adapter's update folded in (shapes checked)."""
    updates: dict[str, list[tuple]] = {}
    for adapter, per_layer in zip(adapters, layers, strict=True):
        for name, (a, b, scale) in updates_by_weight(per_layer.get(index, {}), adapter.settings.scaling).items():
            updates.setdefault(name, []).append((a, b, scale * adapter.weight))
    out = dict(tensors)
    for name, items in updates.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: the base has no {name} for the adapter's update; the adapter was trained "
                                  "on another model")
        weight = tensors[name]
        for a, b, _ in items:
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(weight.shape)}, but the adapter's update is "
                                      f"{tuple(b.shape)} x {tuple(a.shape)}; the adapter was trained on another model")
        out[name] = check_finite(merged_weight(weight, items), path, name, _overflow(adapters))
    return out


def _overflow(adapters: list[Adapter]) -> str:
    weights = ", ".join(f"{a.folder} x {a.weight:g}" for a in adapters)
    return f"merging {weights} overflows; lower the --weight"


def merged_layers(base: Path, adapters: list[Adapter],
                  partial: bool = False) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(layer index, merged tensors) for every weight file of ``base``, one layer at a time (``partial``: an Adapter
    v2 checkpoint without its prompt, see :func:`_partially_merged_layers`)."""
    if not all(a.is_lora for a in adapters):
        yield from _partially_merged_layers(base, adapters, partial)
        return
    layers = [adapter_layers(a.folder) for a in adapters]
    # a LoRA reward model trains its score head whole: it replaces the base's vocabulary head (or adds one beside a
    # tied embedding)
    scores = {i: t["score.weight"] for per_layer in layers for i, t in per_layer.items() if "score.weight" in t}
    if scores and (len(adapters) > 1 or adapters[0].weight != 1.0):
        raise CheckpointError(f"{adapters[0].folder}: a reward model's adapter (it carries a score head) merges alone "
                              "and unweighted")
    indices = sorted(set(layer_indices(base)) | set(scores))
    for adapter, per_layer in zip(adapters, layers, strict=True):
        _check_layers(adapter, per_layer, indices, base)
    for index in indices:
        if index in scores:
            yield index, {"score.weight": scores[index]}
            continue
        path = layer_file(base, index)
        yield index, merged_layer(index, read_layer_file(path), adapters, layers, path)


def _check_layers(adapter: Adapter, per_layer: dict, indices: list[int], base: Path) -> None:
    extra = sorted(set(per_layer) - set(indices))
    if extra:
        raise CheckpointError(f"{adapter.folder}: adapter tensors for layer {extra[0]}, which the base {base} "
                              "does not have; the adapter was trained on another model")


def lone_adapter(adapters: list[Adapter]) -> Adapter:
    """The one Adapter / Adapter v2 checkpoint of ``adapters``: it applies alone and unweighted."""
    adapter = next(a for a in adapters if not a.is_lora)
    if len(adapters) > 1:
        raise CheckpointError(f"{adapter.folder}: an {kind(adapter.settings)} checkpoint applies alone; it cannot be "
                              "combined with other adapters")
    if adapter.weight != 1.0:
        raise CheckpointError(f"{adapter.folder}: weight {adapter.weight:g}: only LoRA updates can be weighted")
    return adapter


def _partially_merged_layers(base: Path, adapters: list[Adapter],
                             partial: bool) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """An Adapter v2 checkpoint's scales, biases and norms folded into ``base`` (``partial`` must be set: its prompt
    and gates are dropped); an Adapter (v1) checkpoint has nothing that folds."""
    from neox_llama.peft.adapter import folded_layer, is_norm_tensor

    adapter = lone_adapter(adapters)
    if not adapter.settings.v2:
        raise CheckpointError(f"{adapter.folder}: an Adapter checkpoint is a learned prompt and its gates, which "
                              "cannot be folded into plain Llama weights; apply it with --adapter (generate.py, "
                              "evaluate.py, serve.py), or export it to PEFT with convert_to_hf.py --peft")
    if not partial:
        raise CheckpointError(f"{adapter.folder}: an Adapter v2 checkpoint's learned prompt cannot be folded into "
                              "plain Llama weights; tools/merge_lora.py --partial merges its scales, biases and "
                              "norms and drops the prompt (the result equals the adapted model only where its gates "
                              "are zero), or apply it with --adapter")
    trained = adapter_layers(adapter.folder)
    indices = layer_indices(base)
    _check_layers(adapter, trained, indices, base)
    for index in indices:
        path = layer_file(base, index)
        tensors = read_layer_file(path)
        for name, value in trained.get(index, {}).items():
            if name.startswith("attention.adapter."):
                continue  # the prompt and gate, dropped
            target = name if is_norm_tensor(name) else name.split(".adapter.")[0] + ".weight"
            if target not in tensors:
                raise CheckpointError(f"{path}: the base has no {target} for the adapter's {name}; the adapter was "
                                      "trained on another model")
            if value.shape[0] != tensors[target].shape[0]:
                raise CheckpointError(f"{path}: {name} has {value.shape[0]} features, {target} {tensors[target].shape[0]}; "
                                      "the adapter was trained on another model")
        try:
            folded = folded_layer(tensors, trained.get(index, {}))
        except KeyError as err:
            raise CheckpointError(f"{adapter.folder}: layer {index}: adapter tensor {err} is missing beside its "
                                  "companions; the checkpoint is incomplete") from None
        for name, tensor in folded.items():
            if tensor is not tensors.get(name):  # the folded ones; the rest was checked as it was read
                check_finite(tensor, path, name, f"folding {adapter.folder} into the base overflows")
        yield index, folded


def merge_to_checkpoint(adapters: list[Adapter], output: str | Path, base: str | Path | None = None,
                        force: bool = False, partial: bool = False) -> Path:
    """Write base + adapters as a full checkpoint folder ``output`` (through a temporary folder renamed at the end).

    The merged checkpoint keeps the first adapter's config without its adapter keys, the base's tokenizer files and
    the adapter's prompt style; generate.py, convert_to_hf.py and further training take it like any checkpoint.
    ``partial``: an Adapter v2 checkpoint's scales, biases and norms without its prompt; the merged linear layers
    then have biases (``use_bias_in_attn_linear`` / ``use_bias_in_mlp``; HF ``attention_bias`` / ``mlp_bias``).
    ``force`` accepts a base whose fingerprint differs and weights beyond ``MAX_WEIGHT`` (:func:`check_weight`); a
    merged tensor that is not finite stops the merge, and nothing is left at ``output``.
    """
    from neox_llama.config.loading import dump_raw, load_raw

    for adapter in adapters:
        check_weight(adapter.weight, adapter.folder, force)
    output = Path(output)
    problem = output_dir_problem(output, force=False)
    if problem:
        raise CheckpointError(problem.removesuffix(" or pass --force"))  # --force here is about the base's hash
    if partial and all(a.is_lora for a in adapters):
        raise CheckpointError("--partial is for Adapter v2 checkpoints (a LoRA merge is always complete); drop it")
    base_folder = find_base(adapters, base, force)
    base_meta = read_metadata(base_folder)
    first = adapters[0]
    with building_dir(output) as tmp:
        biased = set()
        for index, tensors in merged_layers(base_folder, adapters, partial):
            write_layer_file(layer_file(tmp, index), tensors)
            biased |= {name.split(".")[0] for name in tensors if name.endswith(".bias") and "norm" not in name}
        raw, _ = load_raw([first.folder / "config.yml"], apply_presets=False)
        for key in PEFT_KEYS:
            raw.pop(key, None)
        if not first.is_lora:  # Adapter v2: every scaled and shifted linear layer of a block now has a bias
            raw["use_bias_in_attn_linear"] = raw.get("use_bias_in_attn_linear", False) or "attention" in biased
            raw["use_bias_in_mlp"] = raw.get("use_bias_in_mlp", False) or "mlp" in biased
        dump_raw(raw, tmp / "config.yml", header=f"# merged by tools/merge_lora.py from {first.folder}")
        for name in base_meta.tokenizer_files:
            shutil.copyfile(base_folder / name, tmp / name)
        meta = Metadata(
            tag="merged", step=first.metadata.step, layout=Layout(world_size=first.metadata.layout.world_size,
                                                                  pipe_parallel_size=first.metadata.layout.pipe_parallel_size,
                                                                  model_parallel_size=first.metadata.layout.model_parallel_size),
            tokenizer_files=list(base_meta.tokenizer_files), precision=base_meta.precision,
            prompt_style=first.metadata.prompt_style, base=first.metadata.base,
            merged_from=[{"path": str(a.folder.resolve()), "fingerprint": fingerprint(a.folder), "weight": a.weight,
                          "step": a.metadata.step, ("lora" if a.is_lora else "adapter"): a.settings.to_dict(),
                          **({} if a.is_lora else {"partial": True})} for a in adapters])
        write_metadata(tmp, meta)
    logger.info("merged %s into %s -> %s", ", ".join(f"{a.folder} x {a.weight:g}" for a in adapters), base_folder,
                output)
    return output
