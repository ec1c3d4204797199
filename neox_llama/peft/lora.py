"""LoRA (Hu et al., 2021): a frozen matrix W gains a trainable low-rank update, ``y = W x + (alpha / r) B A x``.

``A`` [r, in] starts from PEFT's Kaiming-uniform draw (seeded per layer and name, so every layout starts the
same) and ``B`` [out, r] from zeros, so step 0 is the base model exactly. An adapter is a child ``lora`` of the
linear layer it adapts, added to its output by a forward hook, so the base's parameter names (and checkpoint
files) do not change: ``3.attention.query.weight`` stays, ``3.attention.query.lora.a`` / ``.lora.b`` join it.

An adapter follows its layer's shard record (neox_llama/model/factory.py): on one device both matrices are
whole; tensor-parallel, a column layer's ``B`` is split by output rows like ``W`` and a row layer's ``A`` by input
columns, with the same collective between ``A`` and ``B`` that the layer itself needs (asked of the layer factory,
which knows parallel layers, not LoRA).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neox_llama.model.factory import LayerFactory, full_shape, shard
from neox_llama.model.init import seeded_generator
from neox_llama.peft.switch import adapters_enabled

TARGETS: dict[str, tuple[str, ...]] = {
    "query": ("attention.query",), "key": ("attention.key",), "value": ("attention.value",),
    "output": ("attention.dense",), "mlp": ("mlp.gate", "mlp.up", "mlp.down"), "gate": ("mlp.gate",),
    "up": ("mlp.up",), "down": ("mlp.down",), "head": ("head",),
}
"""A ``lora_targets`` entry -> the paths of the linear layers it adapts, inside a block or the head layer."""


@dataclass(frozen=True)
class LoraSettings:
    """Everything that defines an adapter's shapes and its update (saved with every adapter checkpoint)."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return dict(asdict(self), targets=list(self.targets))

    @classmethod
    def from_dict(cls, data: dict) -> LoraSettings:
        return cls(int(data["r"]), float(data["alpha"]), float(data["dropout"]), tuple(data["targets"]))

    @classmethod
    def from_config(cls, cfg) -> LoraSettings | None:
        if not cfg.lora_r:
            return None
        return cls(cfg.lora_r, float(cfg.lora_alpha), float(cfg.lora_dropout), tuple(cfg.lora_targets))


class LoRA(nn.Module):
    """The update ``scaling x B (A (dropout(x)))`` of one linear layer, sharded as the layer is (``factory``: the
    factory that made it). A column layer (weight split by output rows): ``B`` split the same way, the gradient of
    ``A x`` summed over the group; a row layer (split by input columns): ``A`` split so, ``A x`` summed."""

    def __init__(self, linear: nn.Module, settings: LoraSettings, factory: LayerFactory):
        super().__init__()
        split = getattr(linear.weight, "partition_dim", None)
        out_features, in_features = full_shape(linear.weight)
        self.a = factory.parameter((settings.r, in_features), 1 if split == 1 else None)
        self.b = factory.parameter((out_features, settings.r), 0 if split == 0 else None)
        self.split = split
        self.factory = factory
        self.scaling = settings.scaling
        self.dropout = nn.Dropout(settings.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(self.dropout(x), self.a)
        if self.split == 0:
            hidden = self.factory.summed_over_group(hidden)
        elif self.split == 1:
            hidden = self.factory.reduced_over_group(hidden)
        return F.linear(hidden, self.b) * self.scaling


def _add_update(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    if not adapters_enabled():  # a preference run's reference: the base alone (peft/switch.py)
        return output
    return output + module.lora(inputs[0])


@torch.no_grad()
def _init(adapter: LoRA, layer_index: int, path: str, seed: int) -> None:
    """A as PEFT draws it (kaiming_uniform with a = sqrt(5): bound 1 / sqrt(in)), layout-free; B zero."""
    shape = full_shape(adapter.a)
    bound = 1.0 / math.sqrt(shape[1])
    full = torch.empty(shape).uniform_(-bound, bound, generator=seeded_generator("lora", seed, layer_index, path))
    adapter.a.copy_(shard(full, adapter.a).to(adapter.a.dtype))
    adapter.b.zero_()


def target_paths(settings: LoraSettings) -> list[str]:
    return [path for target in settings.targets for path in TARGETS[target]]


def apply_lora(layers: dict[int, nn.Module], settings: LoraSettings, factory: LayerFactory, seed: int) -> int:
    """Freeze every parameter of ``layers`` (global index -> module) and attach adapters to the targeted linear
    layers; returns how many adapters were attached. ``factory``: the one that made the layers."""
    paths = target_paths(settings)
    for layer in layers.values():
        for param in layer.parameters():
            param.requires_grad_(False)
    attached = 0
    for index, layer in layers.items():
        modules = dict(layer.named_modules())
        for path in paths:
            linear = modules.get(path)
            if linear is None or hasattr(linear, "lora"):
                continue  # e.g. mlp.gate of a gelu MLP; or a tied layer seen twice
            device, dtype = linear.weight.device, linear.weight.dtype
            adapter = LoRA(linear, settings, factory).to(device=device, dtype=dtype)
            _init(adapter, index, path, seed)
            linear.add_module("lora", adapter)
            linear.register_forward_hook(_add_update)
            attached += 1
    return attached


def merged_weight(weight: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """``W + sum of scale x B A`` over ``updates`` ((A, B, scale) each), in float32, returned in W's dtype: the one
    rule every merge uses (tools/merge_lora.py, generation with --adapter), so they agree to the bit."""
    merged = weight.float()
    for a, b, scale in updates:
        merged = merged + scale * (b.float() @ a.float())
    return merged.to(weight.dtype)
