"""LoRA (Hu et al., 2021): a frozen matrix W gains a trainable low-rank update, ``y = W x + (alpha / r) B A x``.

``A`` [r, in] starts from PEFT's Kaiming-uniform draw (seeded per layer and name, so every layout starts the
same) and ``B`` [out, r] from zeros, so step 0 is the base model exactly. An adapter is a child ``lora`` of the
linear layer it adapts, added to its output by a forward hook, so the base's parameter names (and checkpoint
files) do not change: ``3.attention.query.weight`` stays, ``3.attention.query.lora.a`` / ``.lora.b`` join it.

The layer factory makes the adapter that fits each linear layer: on one device a plain one; tensor-parallel
(``neox_llama.parallel.tensor_parallel``) a column layer's ``B`` is split by output rows like ``W`` and a row
layer's ``A`` by input columns, with the same collective between ``A`` and ``B`` that the layer itself needs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neox_llama.model.factory import mark_partition

TARGETS: dict[str, tuple[str, ...]] = {
    "query": ("attention.query",), "key": ("attention.key",), "value": ("attention.value",),
    "output": ("attention.dense",), "mlp": ("mlp.gate", "mlp.up", "mlp.down"), "head": ("head",),
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
    """The update ``scaling x B (A (dropout(x)))`` of one linear layer (a single-device one here)."""

    def __init__(self, a_shape: tuple[int, int], b_shape: tuple[int, int], settings: LoraSettings):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(a_shape))
        self.b = nn.Parameter(torch.zeros(b_shape))
        mark_partition(self.a, None, 1, 0)
        mark_partition(self.b, None, 1, 0)
        self.scaling = settings.scaling
        self.dropout = nn.Dropout(settings.dropout)

    def between(self, hidden: torch.Tensor) -> torch.Tensor:
        """What runs between A and B (tensor parallel: the layer's collective)."""
        return hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.between(F.linear(self.dropout(x), self.a))
        return F.linear(hidden, self.b) * self.scaling


def _add_update(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(inputs[0])


def _generator(seed: int, layer_index: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"lora/{seed}/{layer_index}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def _init(adapter: LoRA, layer_index: int, path: str, seed: int) -> None:
    """A as PEFT draws it (kaiming_uniform with a = sqrt(5): bound 1 / sqrt(in)), layout-free; B zero."""
    from neox_llama.model.init import full_shape, shard

    shape = full_shape(adapter.a)
    bound = 1.0 / math.sqrt(shape[1])
    full = torch.empty(shape).uniform_(-bound, bound, generator=_generator(seed, layer_index, path))
    adapter.a.copy_(shard(full, adapter.a).to(adapter.a.dtype))
    adapter.b.zero_()


def target_paths(settings: LoraSettings) -> list[str]:
    return [path for target in settings.targets for path in TARGETS[target]]


def apply_lora(layers: dict[int, nn.Module], settings: LoraSettings, factory, seed: int) -> int:
    """Freeze every parameter of ``layers`` (global index -> module) and attach adapters to the targeted linear
    layers; returns how many adapters were attached. ``factory`` (a LayerFactory) makes each adapter."""
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
            adapter = factory.lora(linear, settings).to(device=device, dtype=dtype)
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
