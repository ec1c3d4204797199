"""A LoRA checkpoint -> a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

``peft.PeftModel.from_pretrained(<the base exported by convert_to_hf.py>, DIR)`` gives the same logits as
neox_llama's base + adapter: PEFT's LoRA is ``W x + (lora_alpha / r) B A x`` as ours, ``lora_A`` is our ``a``
[r, in] and ``lora_B`` our ``b`` [out, r]; a head adapter's B loses the vocabulary padding rows like the head.
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
        raise CheckpointError(f"{checkpoint}: --peft exports a LoRA checkpoint; this is a full checkpoint "
                              "(export it without --peft)")
    adapter = run.adapters[0]
    try:
        hf_config_dict(run.args, run.true_vocab)  # the base must have a Hugging Face Llama form for PEFT to apply to
    except ValueError as err:
        raise CheckpointError(f"{run.folder}: {err}") from None
    ours_to_hf = {ours: hf for hf, ours in hf_to_ours(run.args).items()}
    tensors, modules = {}, set()
    for index, layer in adapter_layers(adapter.folder).items():
        for name, tensor in layer.items():
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
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(run.folder),
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
    }
    with building_dir(output) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_model.safetensors").chmod(default_file_mode())
    logger.info("exported the LoRA adapter %s (base %s) as a PEFT adapter to %s", adapter.folder, run.folder, output)
    return output
