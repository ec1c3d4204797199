"""LLaMA-Adapter (v1) and Adapter v2 checkpoints as an adapter run saves them, with random trained tensors."""

from __future__ import annotations

import torch
import yaml

from neox_llama.checkpoint.adapter import adapter_file, base_ref
from neox_llama.checkpoint.metadata import Layout, Metadata, write_metadata
from neox_llama.checkpoint.run import load_model
from neox_llama.checkpoint.weights import write_layer_file
from neox_llama.model.factory import SINGLE_DEVICE
from neox_llama.peft.adapter import AdapterSettings, apply_adapter, is_adapter_tensor


def adapted(base, settings: AdapterSettings):
    """The base model with the adapter attached (its initial tensors), in eval mode, and the run."""
    model, run = load_model(base)
    layers = {int(i): m for i, m in model.named_children()}
    apply_adapter(layers, settings, SINGLE_DEVICE, run.args, seed=11)
    return model.eval(), run


def adapter_checkpoint(folder, base, settings: AdapterSettings, seed: int, step: int = 4, style: str | None = None):
    """An adapter checkpoint as an adapter run saves it, with random (non-zero) trained tensors; returns them too."""
    model, _ = adapted(base, settings)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    saved = {}
    for index, layer in model.named_children():
        tensors = {n: p.detach() + 0.2 * torch.randn(p.shape, generator=gen)
                   for n, p in layer.named_parameters() if is_adapter_tensor(n, settings)}
        if tensors:
            write_layer_file(adapter_file(folder, int(index)), tensors)
            saved.update({f"{index}.{n}": t for n, t in tensors.items()})
    config = yaml.safe_load((base / "config.yml").read_text())
    config.update(peft_method=settings.method, adapter_prompt_length=settings.prompt_length,
                  adapter_start_layer=settings.start_layer, adapter_gate=settings.gate, finetune=True, load=str(base))
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    write_metadata(folder, Metadata(tag=folder.name, step=step, layout=Layout(zero_stage=0), base=base_ref(base),
                                    adapter=settings.to_dict(), prompt_style=style))
    return folder, saved
