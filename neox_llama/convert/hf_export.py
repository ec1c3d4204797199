"""A neox_llama checkpoint -> a Hugging Face Llama directory (config, generation config, safetensors, tokenizer)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from neox_llama.checkpoint.merge import merged_layers
from neox_llama.checkpoint.paths import CheckpointError
from neox_llama.checkpoint.run import Run, load_run
from neox_llama.checkpoint.weights import read_full_state
from neox_llama.convert.hf_names import expected_shape, hf_config_dict, hf_to_ours
from neox_llama.convert.hf_tokenizer_export import write_tokenizer_files
from neox_llama.utils.files import building_dir, default_file_mode, output_dir_problem

logger = logging.getLogger(__name__)

SHARD_BYTES = 5 * 1024**3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_state_dict(ckpt: Run, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hugging Face tensors, vocabulary padding trimmed (a LoRA checkpoint's base with its adapter merged)."""
    if ckpt.adapters:
        ours = {f"{index}.{name}": tensor for index, tensors in merged_layers(ckpt.folder, ckpt.adapters)
                for name, tensor in tensors.items()}
    else:
        ours = read_full_state(ckpt.folder)
    out = {}
    for hf_name, our_name in hf_to_ours(ckpt.args).items():
        if our_name not in ours:
            if hf_name.endswith(".bias") and our_name.endswith(".bias"):
                continue  # the model has no biases
            raise CheckpointError(f"{ckpt.folder}: tensor {our_name} (for {hf_name}) is missing")
        tensor = ours.pop(our_name)
        expected = expected_shape(ckpt.args, our_name.split(".", 1)[1])
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{ckpt.folder}: {our_name} has shape {tuple(tensor.shape)}, but its config.yml "
                                  f"implies {expected}")
        if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[: ckpt.true_vocab]
        out[hf_name] = tensor.to(dtype).contiguous()
    if ours:
        raise CheckpointError(f"{ckpt.folder}: tensors with no Hugging Face name: {', '.join(sorted(ours)[:5])}")
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], output: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata={"format": "pt"})
        (output / "model.safetensors").chmod(default_file_mode())  # safetensors creates 0600 files
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(output / name), metadata={"format": "pt"})
        (output / name).chmod(default_file_mode())
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_to_hf(checkpoint: str | Path, output: str | Path, dtype: str = "bf16", force: bool = False,
                 base: str | Path | None = None) -> Path:
    """Write the Hugging Face directory ``output`` (through a temporary directory renamed at the end)."""
    from transformers import GenerationConfig, LlamaConfig

    output = Path(output)
    problem = output_dir_problem(output, force)
    if problem:
        raise CheckpointError(problem)
    ckpt = load_run(checkpoint, base=base)
    try:
        config_kwargs = hf_config_dict(ckpt.args, ckpt.true_vocab)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.folder}: {err}") from None
    tensors = hf_state_dict(ckpt, DTYPES[dtype])
    with building_dir(output) as tmp:
        ids = write_tokenizer_files(ckpt.tokenizer, tmp) if ckpt.tokenizer else {}
        config = LlamaConfig(**config_kwargs, **ids, dtype=dtype_name(dtype), architectures=["LlamaForCausalLM"])
        config.save_pretrained(tmp)
        _add_legacy_rope_keys(tmp / "config.json", config_kwargs["rope_parameters"])
        stops = [i for i in (ids.get("eos_token_id"), getattr(ckpt.tokenizer, "eot_id", None)) if i is not None]
        GenerationConfig(bos_token_id=ids.get("bos_token_id"), eos_token_id=stops or None).save_pretrained(tmp)
        _write_safetensors(tensors, tmp)
    logger.info("exported %s to %s (%s)", ckpt.folder, output, dtype)
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
