"""LoRA checkpoints as a LoRA run saves them (random, non-zero adapters) and the unmerged forward they stand for."""

from __future__ import annotations

import torch
import yaml

from helpers.checkpoints import TINY
from neox_llama.checkpoint.adapter import adapter_file, base_ref, fill_adapters
from neox_llama.checkpoint.metadata import Layout, Metadata, write_metadata
from neox_llama.checkpoint.run import load_model
from neox_llama.checkpoint.weights import write_layer_file
from neox_llama.model.factory import SINGLE_DEVICE
from neox_llama.peft.lora import LoraSettings, apply_lora

UNTIED = {**TINY, "no_weight_tying": True}
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 64, 100, 3]])
SETTINGS = LoraSettings(r=3, alpha=7.0, dropout=0.0, targets=("key", "output", "mlp", "head"))


def adapter_checkpoint(folder, base, settings: LoraSettings, seed: int, step: int = 6, style: str = "alpaca"):
    """A LoRA checkpoint as a LoRA run saves it, with random (non-zero) A and B."""
    model, _ = load_model(base)
    layers = {int(i): m for i, m in model.named_children()}
    apply_lora(layers, settings, SINGLE_DEVICE, seed)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for index, layer in layers.items():
        tensors = {n: torch.randn(p.shape, generator=gen) * 0.1 for n, p in layer.named_parameters() if ".lora." in n}
        if tensors:
            write_layer_file(adapter_file(folder, index), tensors)
    config = yaml.safe_load((base / "config.yml").read_text())
    config.update(lora_r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                  lora_targets=list(settings.targets), finetune=True, load=str(base))
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    write_metadata(folder, Metadata(tag=folder.name, step=step, layout=Layout(zero_stage=0), prompt_style=style,
                                    base=base_ref(base), lora=settings.to_dict()))
    return folder


def unmerged_logits(base, adapter, settings):
    """The adapter run's forward: base weights, adapters attached (hooks), no merge."""
    model, _ = load_model(base)
    layers = {int(i): m for i, m in model.named_children()}
    apply_lora(layers, settings, SINGLE_DEVICE, 0)
    fill_adapters(layers, adapter, settings)
    with torch.no_grad():
        return model.eval()(IDS)
