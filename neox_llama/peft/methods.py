"""The parameter-efficient methods side by side: LoRA (peft/lora.py), Adapter and Adapter v2 (peft/adapter.py).

One place answers, for any of them: which settings a config or a checkpoint's metadata holds, how the settings
attach to a model's layers, which of a layer's tensors the method trains (and an adapter checkpoint saves), and
how to name it in a message.
"""

from __future__ import annotations

from torch import nn

from neox_llama.peft.adapter import AdapterSettings, apply_adapter, is_adapter_tensor
from neox_llama.peft.lora import LoraSettings, apply_lora

PeftSettings = LoraSettings | AdapterSettings
"""The settings of one parameter-efficient method."""


def peft_settings(cfg) -> PeftSettings | None:
    """The method a config trains with: LoRA when ``lora_r`` > 0, Adapter (v2) by ``peft_method``, else None."""
    return LoraSettings.from_config(cfg) or AdapterSettings.from_config(cfg)


def settings_of(meta) -> PeftSettings | None:
    """The method an adapter checkpoint's metadata names (None: a full checkpoint); ValueError when malformed."""
    try:
        if meta.lora is not None:
            return LoraSettings.from_dict(meta.lora)
        if meta.adapter is not None:
            return AdapterSettings.from_dict(meta.adapter)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed {'lora' if meta.lora is not None else 'adapter'} settings in metadata.json "
                         f"({type(err).__name__}: {err})") from None
    return None


def apply_peft(layers: dict[int, nn.Module], settings: PeftSettings, factory, args, seed: int) -> int:
    """Freeze ``layers`` (global index -> module) and attach the method's trainable modules; returns how many."""
    if isinstance(settings, LoraSettings):
        return apply_lora(layers, settings, factory, seed)
    return apply_adapter(layers, settings, factory, args, seed)


def is_trained(name: str, settings: PeftSettings) -> bool:
    """Whether parameter ``name`` (within a layer) is trained by ``settings`` (and kept in its checkpoints); a reward
    model's score head always is."""
    if name == "score.weight":
        return True
    if isinstance(settings, LoraSettings):
        return ".lora." in f".{name}"
    return is_adapter_tensor(name, settings)


def trained_tensors(layer: nn.Module, settings: PeftSettings) -> dict[str, nn.Parameter]:
    """The parameters of ``layer`` that ``settings`` trains, by name (this rank's shards)."""
    return {name: p for name, p in layer.named_parameters() if is_trained(name, settings)}


def describe(settings: PeftSettings) -> str:
    """A short human description, e.g. ``LoRA r 8, alpha 16, targets query, value``."""
    if isinstance(settings, LoraSettings):
        return f"LoRA r {settings.r}, alpha {settings.alpha:g}, targets {', '.join(settings.targets)}"
    name = "Adapter v2" if settings.v2 else "Adapter"
    return (f"{name}: {settings.prompt_length} prompt tokens from block {settings.start_layer}, "
            f"gate {settings.gate.replace('_', ' ')}")


def kind(settings: PeftSettings) -> str:
    """``LoRA``, ``Adapter`` or ``Adapter v2`` (for messages)."""
    if isinstance(settings, LoraSettings):
        return "LoRA"
    return "Adapter v2" if settings.v2 else "Adapter"


def same_shapes(saved: PeftSettings, configured: PeftSettings) -> bool:
    """Whether a run configured with ``configured`` can resume a checkpoint trained with ``saved`` (LoRA targets in
    any order; LoRA dropout may change)."""
    if isinstance(saved, LoraSettings) and isinstance(configured, LoraSettings):
        return (saved.r, saved.alpha, sorted(saved.targets)) == (configured.r, configured.alpha,
                                                                  sorted(configured.targets))
    return saved == configured
