"""A neox_llama checkpoint -> a Hugging Face Llama directory (config, generation config, safetensors, tokenizer)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from neox_llama.checkpoint.merge import merged_layers
from neox_llama.checkpoint.paths import CheckpointError, layer_file
from neox_llama.checkpoint.run import Run, load_run
from neox_llama.checkpoint.weights import check_finite, layer_indices, read_layer_file
from neox_llama.convert.hf_names import expected_shape, hf_config_dict, hf_to_ours
from neox_llama.convert.hf_tokenizer_export import reward_pad_id, write_tokenizer_files
from neox_llama.utils.files import building_dir, default_file_mode, output_dir_problem

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "5GB"
"""Hugging Face's usual shard size; memory while exporting is about one shard."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _layer_table(args) -> dict[int, list[tuple[str, str]]]:
    """Layer index -> [(Hugging Face name, our name inside the layer)], in Hugging Face's order."""
    table: dict[int, list[tuple[str, str]]] = {}
    for hf_name, ours in hf_to_ours(args).items():
        index, name = ours.split(".", 1)
        table.setdefault(int(index), []).append((hf_name, name))
    return table


def hf_tensors(ckpt: Run, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) one layer at a time, vocabulary padding trimmed (a LoRA checkpoint's base with its
    adapter merged); at most one layer of the checkpoint is read at once, each tensor checked for NaN and Inf as it
    is read (and again after a cast to fp16, which overflows beyond 65504)."""
    table = _layer_table(ckpt.args)
    indices = layer_indices(ckpt.folder)
    if ckpt.adapters and ckpt.args.num_labels:  # a LoRA reward model's score head comes from its adapter
        indices = sorted(set(indices) | {ckpt.args.num_layers + 2})
    extra = sorted(set(indices) - set(table))
    if extra:
        raise CheckpointError(f"{layer_file(ckpt.folder, extra[0])}: the model in its config.yml has no layer "
                              f"{extra[0]} with weights")
    missing = sorted(set(table) - set(indices))
    if missing:
        raise CheckpointError(f"{layer_file(ckpt.folder, missing[0])}: missing (the checkpoint has no weights for "
                              f"layer {missing[0]})")
    if ckpt.adapters:
        layers = merged_layers(ckpt.folder, ckpt.adapters)
    else:
        layers = ((index, read_layer_file(layer_file(ckpt.folder, index))) for index in sorted(table))
    for index, ours in layers:
        for hf_name, name in table.get(index, []):
            if name not in ours:
                if name.endswith(".bias"):
                    continue  # the model has no biases
                raise CheckpointError(f"{ckpt.folder}: tensor {index}.{name} (for {hf_name}) is missing")
            tensor = ours.pop(name)
            expected = expected_shape(ckpt.args, name)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{ckpt.folder}: {index}.{name} has shape {tuple(tensor.shape)}, but its "
                                      f"config.yml implies {expected}")
            if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
                tensor = tensor[: ckpt.true_vocab]
            out = tensor.to(dtype).contiguous()
            if dtype == torch.float16 and tensor.dtype != torch.float16:  # fp16 overflows beyond 65504
                check_finite(out, layer_file(ckpt.folder, index), name, "its values do not fit fp16 (largest 65504); "
                             "export with --dtype bf16 or fp32")
            yield hf_name, out
        if ours:
            raise CheckpointError(f"{ckpt.folder}: tensors with no Hugging Face name: "
                                  f"{', '.join(f'{index}.{n}' for n in sorted(ours)[:5])}")


def parse_size(text: str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain number (Hugging Face's ``max_shard_size`` style)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise CheckpointError(f"--max-shard-size {text!r}: not a size (e.g. 5GB, 500MB or a number of bytes)")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise CheckpointError(f"--max-shard-size {text!r}: must be more than 0 bytes")
    return size


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except (SafetensorError, OSError) as err:  # e.g. a full disk
        raise CheckpointError(f"{path}: cannot write ({err})") from None
    path.chmod(default_file_mode())  # safetensors creates 0600 files


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], output: Path, max_shard_bytes: int) -> None:
    """Write ``tensors`` as Hugging Face safetensors shards of at most ``max_shard_bytes`` each (a tensor larger than
    that gets a shard of its own), holding one shard in memory at a time; one shard is ``model.safetensors``."""
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush() -> None:
        path = output / f".shard-{len(written) + 1:05d}.safetensors"
        _save_shard(shard, path)
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    if shard or not written:
        flush()
    if len(written) == 1:
        written[0][0].rename(output / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(output / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_to_hf(checkpoint: str | Path, output: str | Path, dtype: str = "bf16", force: bool = False,
                 base: str | Path | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE) -> Path:
    """Write the Hugging Face directory ``output`` (through a temporary directory renamed at the end), reading the
    checkpoint one layer at a time: memory stays near one output shard (``max_shard_size``) plus one layer."""
    from transformers import GenerationConfig, LlamaConfig

    output = Path(output)
    shard_bytes = parse_size(max_shard_size)
    problem = output_dir_problem(output, force)
    if problem:
        raise CheckpointError(problem)
    ckpt = load_run(checkpoint, base=base)
    try:
        config_kwargs = hf_config_dict(ckpt.args, ckpt.true_vocab)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.folder}: {err}") from None
    reward = bool(ckpt.args.num_labels)
    pad = reward_pad_id(ckpt.tokenizer) if reward and ckpt.tokenizer else None
    if reward and pad is None:
        raise CheckpointError(f"{ckpt.folder}: a reward model's export needs a pad token that is never a real token "
                              "(transformers scores the last token that is not padding), and its tokenizer has none "
                              "(no pad, no unknown token besides BOS/EOS)")
    architecture = "LlamaForSequenceClassification" if reward else "LlamaForCausalLM"
    with building_dir(output) as tmp:
        ids = write_tokenizer_files(ckpt.tokenizer, tmp, ckpt.prompt_style, pad) if ckpt.tokenizer else {}
        config = LlamaConfig(**config_kwargs, **ids, dtype=dtype_name(dtype), architectures=[architecture])
        config.save_pretrained(tmp)
        _add_legacy_rope_keys(tmp / "config.json", config_kwargs["rope_parameters"])
        stops = [i for i in (ids.get("eos_token_id"), getattr(ckpt.tokenizer, "eot_id", None)) if i is not None]
        if not reward:  # a reward model scores, it does not generate
            GenerationConfig(bos_token_id=ids.get("bos_token_id"), eos_token_id=stops or None).save_pretrained(tmp)
        write_safetensors(hf_tensors(ckpt, DTYPES[dtype]), tmp, shard_bytes)
    logger.info("exported %s to %s (%s)", ckpt.folder, output, dtype)
    if ckpt.tokenizer and ckpt.prompt_style and (output / "chat_template.jinja").is_file():
        logger.info("chat template: prompt style %s (tokenizer_config.json and chat_template.jinja)", ckpt.prompt_style)
    return output


def dtype_name(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]


def _add_legacy_rope_keys(path: Path, rope: dict) -> None:
    """Also write ``rope_theta`` / ``rope_scaling`` (transformers 4 reads only these; 5 reads rope_parameters)."""
    data = json.loads(path.read_text())
    data.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type") not in (None, "default"):
        data.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
