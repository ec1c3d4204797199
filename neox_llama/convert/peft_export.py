"""A LoRA or Adapter checkpoint -> a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

``peft.PeftModel.from_pretrained(<the base exported by convert_to_hf.py>, DIR)`` gives the same logits as
neox_llama's base + adapter:

- LoRA: PEFT's is ``W x + (lora_alpha / r) B A x`` as ours, ``lora_A`` is our ``a`` [r, in] and ``lora_B`` our
  ``b`` [out, r]; a head adapter's B loses the vocabulary padding rows like the head.
- Adapter (v1) with ``adapter_gate: per_layer``: PEFT's ``adaption_prompt`` is the same maths (keys and values of
  the prompt through the frozen k/v projections without rotary positions, a softmax of their own, one zero-initialised
  gate per layer, the top ``adapter_layers`` layers); ``adaption_prompt`` is our prompt [1, length, hidden] and
  ``adaption_gate`` our gate. Not exportable, with the reason: a per-head gate (PEFT has one per layer), Adapter v2
  (PEFT has no such method), an attention output bias (PEFT applies o_proj, and so its bias, to the prompt's output
  a second time).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from neox_llama.checkpoint.adapter import adapter_layers
from neox_llama.checkpoint.paths import CheckpointError
from neox_llama.checkpoint.run import load_run
from neox_llama.convert.hf_export import DTYPES
from neox_llama.convert.hf_names import hf_config_dict, hf_to_ours
from neox_llama.utils.files import building_dir, default_file_mode, output_dir_problem

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def export_peft(checkpoint: str | Path, output: str | Path, dtype: str = "fp32", force: bool = False,
                base: str | Path | None = None) -> Path:
    """Write the PEFT adapter of LoRA checkpoint ``checkpoint`` to ``output`` (temporary folder, then renamed)."""
    output = Path(output)
    problem = output_dir_problem(output, force)
    if problem:
        raise CheckpointError(problem)
    run = load_run(checkpoint, base=base)
    if len(run.adapters) != 1:
        raise CheckpointError(f"{checkpoint}: --peft exports an adapter checkpoint; this is a full checkpoint "
                              "(export it without --peft)")
    adapter = run.adapters[0]
    try:
        hf_config_dict(run.args, run.true_vocab)  # the base must have a Hugging Face Llama form for PEFT to apply to
    except ValueError as err:
        raise CheckpointError(f"{run.folder}: {err}") from None
    if not adapter.is_lora:
        tensors, config = _adaption_prompt(adapter, run, DTYPES[dtype])
        return _write(output, tensors, config, f"the Adapter {adapter.folder} (base {run.folder})")
    ours_to_hf = {ours: hf for hf, ours in hf_to_ours(run.args).items()}
    tensors, modules = {}, set()
    saved = []
    for index, layer in adapter_layers(adapter.folder).items():
        for name, tensor in layer.items():
            if name == "score.weight":  # a LoRA reward model's head: trained whole, PEFT's modules_to_save
                tensors[f"{PEFT_PREFIX}score.weight"] = tensor.to(DTYPES[dtype]).contiguous()
                saved.append("score")
                continue
            path, kind = name.rsplit(".lora.", 1)
            hf_weight = ours_to_hf.get(f"{index}.{path}.weight")
            if hf_weight is None:
                raise CheckpointError(f"{adapter.folder}: adapter tensor {index}.{name} has no Hugging Face module")
            module = hf_weight.removesuffix(".weight")
            if module == "lm_head" and kind == "b":
                tensor = tensor[: run.true_vocab]
            key = f"{PEFT_PREFIX}{module}.lora_{'A' if kind == 'a' else 'B'}.weight"
            tensors[key] = tensor.to(DTYPES[dtype]).contiguous()
            modules.add(module.rsplit(".", 1)[-1])
    settings = adapter.settings
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if saved else "CAUSAL_LM",
        "base_model_name_or_path": str(run.folder),
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": saved or None, "init_lora_weights": True,
    }
    return _write(output, tensors, config, f"the LoRA adapter {adapter.folder} (base {run.folder})")


def _adaption_prompt(adapter, run, dtype) -> tuple[dict, dict]:
    """PEFT ``adaption_prompt`` tensors and config of an Adapter (v1) checkpoint, or why it has none."""
    settings, args = adapter.settings, run.args
    reason = None
    if settings.v2:
        reason = "PEFT has no Adapter v2 (its scales, biases and norms); merge them with tools/merge_lora.py --partial"
    elif settings.gate == "per_head":
        reason = "it has a gate per attention head (adapter_gate: per_head); PEFT's adaption_prompt has one per layer"
    elif args.use_bias_in_attn_linear:
        reason = "the base's attention output projection has a bias, which PEFT adds to the prompt's output again"
    elif args.num_attention_heads * args.head_dim != args.hidden_size:
        reason = "its heads x head_dim differs from hidden_size, which PEFT's adaption_prompt assumes equal"
    if reason:
        raise CheckpointError(f"{adapter.folder}: this {'Adapter v2' if settings.v2 else 'Adapter'} checkpoint "
                              f"cannot be exported to PEFT: {reason}")
    tensors = {}
    for index, layer in adapter_layers(adapter.folder).items():
        block = index - 1
        prefix = f"{PEFT_PREFIX}model.layers.{block}.self_attn"
        try:
            tensors[f"{prefix}.adaption_prompt"] = layer["attention.adapter.prompt"][None].to(dtype).contiguous()
            tensors[f"{prefix}.adaption_gate"] = layer["attention.adapter.gate"].to(dtype).reshape(1).contiguous()
        except KeyError as err:
            raise CheckpointError(f"{adapter.folder}: layer {index} has no adapter tensor {err}") from None
    expected = {f"{PEFT_PREFIX}model.layers.{b}.self_attn.adaption_prompt"
                for b in range(settings.start_layer, args.num_layers)}
    if expected != {k for k in tensors if k.endswith("adaption_prompt")}:
        raise CheckpointError(f"{adapter.folder}: prompts are not on blocks {settings.start_layer}-"
                              f"{args.num_layers - 1} as its settings say")
    config = {
        "peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(run.folder),
        "adapter_len": settings.prompt_length, "adapter_layers": args.num_layers - settings.start_layer,
        "target_modules": "self_attn", "inference_mode": True,
    }
    return tensors, config


def _write(output: Path, tensors: dict, config: dict, what: str) -> Path:
    with building_dir(output) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_model.safetensors").chmod(default_file_mode())
    logger.info("exported %s as a PEFT adapter to %s", what, output)
    return output
