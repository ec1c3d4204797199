"""A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) -> one of our LoRA adapter
checkpoints on a given base: the inverse of :mod:`neox_llama.convert.peft_export`.

PEFT's update of a module is ``s_m B_m A_m x`` with ``s_m = alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with
``use_rslora``), ``r_m`` and ``alpha_m`` from ``rank_pattern`` / ``alpha_pattern`` or the defaults. Ours has one
``r`` and one ``alpha``: ``r`` is the largest ``r_m``, smaller ranks are padded with zero rows of A and zero columns
of B (which add nothing), and the ratio ``s_m / (alpha / r)`` is folded into B (B is left untouched where the ratio
is 1, so our export comes back bit for bit). A module PEFT does not adapt (``layers_to_transform``) gets zero
tensors. What our format cannot hold is refused, naming the field: DoRA, ``modules_to_save``, a ``bias`` other
than ``none``, a LoRA on a module that is not one of our linear layers, tensors whose shapes are not the base's.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from neox_llama.checkpoint.adapter import adapter_file, base_ref
from neox_llama.checkpoint.metadata import Layout, Metadata, read_metadata, write_metadata
from neox_llama.checkpoint.paths import CheckpointError, layer_file, resolve_checkpoint
from neox_llama.checkpoint.run import load_run
from neox_llama.checkpoint.weights import read_layer_file, write_layer_file
from neox_llama.convert.hf_names import expected_shape, hf_config_dict, hf_to_ours
from neox_llama.utils.files import atomic_write_text, building_dir, output_dir_problem

logger = logging.getLogger(__name__)

PEFT_TARGETS = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "output", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down", "lm_head": "head"}
"""PEFT's module name -> our ``lora_targets`` entry."""
_ORDER = ("query", "key", "value", "output", "gate", "up", "down", "head")
_PATHS = {"query": "attention.query", "key": "attention.key", "value": "attention.value", "output": "attention.dense",
          "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down", "head": "head"}
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight")
_COPY = re.compile(r"base_model\.model\.(.+?)(?:\.base_layer)?\.weight")
"""A base weight PEFT saves beside the adapter (``save_embedding_layers``, e.g. when lm_head is targeted)."""


def _refuse(where: Path, field: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {field}: {why}; our LoRA checkpoints cannot represent it")


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r}: only LORA adapters can be imported")
    if config.get("use_dora"):
        raise _refuse(path, "use_dora", "a DoRA adapter (weight-decomposed, with a magnitude vector)")
    if config.get("modules_to_save"):
        raise _refuse(path, "modules_to_save", f"fully trained copies of {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        raise _refuse(path, "bias", f"{config['bias']!r} trains biases (only bias: none is supported)")
    if config.get("lora_bias"):
        raise _refuse(path, "lora_bias", "a bias on lora_B")
    if config.get("fan_in_fan_out"):
        raise _refuse(path, "fan_in_fan_out", "transposed (Conv1D-style) weights")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        for name in targets:
            if str(name).rsplit(".", 1)[-1] not in PEFT_TARGETS:
                raise _refuse(path, "target_modules", f"{name!r} is not one of our linear layers "
                                                      f"({', '.join(PEFT_TARGETS)})")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{path}: {key} is {config.get(key)!r}; expected a positive number")
    return config


def _pattern(patterns: dict | None, module: str, default: float) -> float:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key equal to the module name or matching its end."""
    for key, value in (patterns or {}).items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def import_peft(adapter_dir: str | Path, base: str | Path, output: str | Path, force: bool = False) -> Path:
    """Write the LoRA checkpoint of PEFT adapter ``adapter_dir`` on base checkpoint ``base`` to
    ``output/global_step0`` (a temporary folder, then renamed); returns that folder."""
    adapter_dir, output = Path(adapter_dir), Path(output)
    problem = output_dir_problem(output, force)
    if problem:
        raise CheckpointError(problem)
    config = _read_config(adapter_dir)
    base_folder = resolve_checkpoint(base).resolve()
    if read_metadata(base_folder).is_adapter:
        raise CheckpointError(f"{base}: is itself an adapter checkpoint; --base must be a full checkpoint")
    run = load_run(base_folder)
    args = run.args
    try:
        hf_config_dict(args, run.true_vocab)
    except ValueError as err:
        raise CheckpointError(f"{base_folder}: {err}") from None
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{weights}: unreadable ({err})") from None
    hf_to_our = hf_to_ours(args)
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # our weight name -> {"A": ..., "B": ...}
    modules: dict[str, str] = {}  # our weight name -> PEFT module name
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            _check_base_copy(weights, key, tensor, base_folder, hf_to_our, run.true_vocab)
            continue
        module, kind = match.groups()
        ours = hf_to_our.get(f"{module}.weight")
        if ours is None or module.rsplit(".", 1)[-1] not in PEFT_TARGETS:
            raise _refuse(weights, key, f"{module} is not one of our linear layers ({', '.join(PEFT_TARGETS)}) "
                                        "in this base")
        pairs.setdefault(ours, {})[kind] = tensor
        modules[ours] = module
    if not pairs:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    targets = sorted({PEFT_TARGETS[m.rsplit(".", 1)[-1]] for m in modules.values()}, key=_ORDER.index)
    rslora = bool(config.get("use_rslora"))
    ranks = {}
    for ours, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{weights}: {modules[ours]} has lora_{'A' if 'B' in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        out_dim, in_dim = expected_shape(args, ours.split(".", 1)[1])
        if modules[ours] == "lm_head":
            out_dim = run.true_vocab
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
            raise _refuse(weights, modules[ours], f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                                                  f"the base's weight [{out_dim}, {in_dim}] (another base model?)")
        ranks[ours] = a.shape[0]
    r = max(ranks.values())
    default_scale = config["lora_alpha"] / (math.sqrt(config["r"]) if rslora else config["r"])
    plain = not rslora and r == config["r"]
    alpha = float(config["lora_alpha"]) if plain else default_scale * r
    scaling = alpha / r
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for ours, pair in pairs.items():
        r_m, module = ranks[ours], modules[ours]
        alpha_m = _pattern(config.get("alpha_pattern"), module, config["lora_alpha"])
        scale_m = alpha_m / (math.sqrt(r_m) if rslora else r_m)
        if r_m != _pattern(config.get("rank_pattern"), module, config["r"]):
            logger.warning("%s: rank %d in the tensors, not the %s of adapter_config.json; the tensors' rank is used",
                           module, r_m, "rank_pattern" if config.get("rank_pattern") else "r")
        a, b = pair["A"].float(), pair["B"].float()
        if scale_m != scaling:
            b = (b.double() * (scale_m / scaling)).float()
        a = torch.cat([a, a.new_zeros(r - r_m, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - r_m)], dim=1)
        if module == "lm_head":
            b = torch.cat([b, b.new_zeros(args.vocab_size - b.shape[0], r)])
        index, name = ours.split(".", 1)
        path = name.removesuffix(".weight")
        layers.setdefault(int(index), {}).update({f"{path}.lora.a": a.contiguous(), f"{path}.lora.b": b.contiguous()})
    _fill_missing(layers, args, targets, r)
    lora = {"r": r, "alpha": alpha, "dropout": float(config.get("lora_dropout", 0.0)), "targets": targets}
    cfg = yaml.safe_load((base_folder / "config.yml").read_text()) if (base_folder / "config.yml").is_file() else {}
    cfg.update(lora_r=r, lora_alpha=alpha, lora_dropout=lora["dropout"], lora_targets=targets, finetune=True,
               load=str(base_folder))
    with building_dir(output) as tmp:
        folder = tmp / "global_step0"
        for index, layer in layers.items():
            write_layer_file(adapter_file(folder, index), layer)
        (folder / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        write_metadata(folder, Metadata(tag="global_step0", layout=Layout(zero_stage=-1), precision="fp32",
                                        converted_from=str(adapter_dir.resolve()), prompt_style=run.prompt_style,
                                        base=base_ref(base_folder), lora=lora))
        atomic_write_text(tmp / "latest", "global_step0")
    logger.info("imported the PEFT adapter %s (r %d, alpha %g, targets %s) on %s", adapter_dir, r, alpha,
                ", ".join(targets), base_folder)
    return output / "global_step0"


def _check_base_copy(weights: Path, key: str, tensor: torch.Tensor, base_folder: Path, hf_to_our: dict[str, str],
                     true_vocab: int) -> None:
    """A saved base weight is fine when it is the base's own (within the export's rounding); anything else is a
    trained copy (``modules_to_save``, resized embeddings) our LoRA checkpoints cannot hold."""
    match = _COPY.fullmatch(key)
    ours = hf_to_our.get(f"{match.group(1)}.weight") if match else None
    if ours is None:
        raise _refuse(weights, key, "not a lora_A / lora_B weight of a linear layer")
    index, name = ours.split(".", 1)
    base = read_layer_file(layer_file(base_folder, int(index))).get(name)
    if base is None:
        raise _refuse(weights, key, f"the base has no {ours}")
    if name in ("word_embeddings.weight", "head.weight"):
        base = base[:true_vocab]
    if base.shape != tensor.shape or not torch.allclose(base.to(tensor.dtype).float(), tensor.float(), rtol=1e-2,
                                                        atol=1e-3):
        raise _refuse(weights, key, f"a weight that differs from the base's {ours} (a trained or resized copy)")


def _fill_missing(layers: dict[int, dict[str, torch.Tensor]], args, targets: list[str], r: int) -> None:
    """Zero tensors for every targeted linear layer PEFT left alone, so each target covers every layer as ours do."""
    for target in targets:
        if target == "head":
            indices, path = [args.num_layers + 2], "head"
        else:
            indices, path = list(range(1, args.num_layers + 1)), _PATHS[target]
        out_dim, in_dim = expected_shape(args, f"{path}.weight")
        for index in indices:
            layer = layers.setdefault(index, {})
            if f"{path}.lora.a" not in layer:
                layer[f"{path}.lora.a"] = torch.zeros(r, in_dim)
                layer[f"{path}.lora.b"] = torch.zeros(out_dim, r)
