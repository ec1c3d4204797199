"""Initialisation that does not depend on the parallel layout.

Every parameter's full tensor is drawn from a generator seeded by (seed, global layer index,
parameter name), then cut to this rank's shard. The same seed therefore gives the same model at any
pipeline / tensor / data-parallel layout.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import full_shape, shard


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by ``parts`` joined with ``/`` (e.g. seed, global layer index, parameter name): the
    same draw whatever the layout; LoRA and Adapter prefix their own names."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def is_output_projection(name: str) -> bool:
    """Matrices whose initialisation is scaled down by depth (they add into the residual stream)."""
    return name.endswith(("attention.dense.weight", "mlp.down.weight"))


def is_norm_tensor(name: str) -> bool:
    """A norm's weight or bias (``input_norm.weight``, ``norm.bias`` ...): every norm's name ends in ``norm``."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2].endswith("norm")


@torch.no_grad()
def init_weights(layer: nn.Module, layer_index: int, args: LlamaArgs) -> None:
    """Initialise one layer: normal(0, std) matrices (output projections std / sqrt(2 x layers)),
    zero biases, unit norm weights."""
    for name, param in layer.named_parameters():
        shape = full_shape(param)
        if is_norm_tensor(name):
            full = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            full = torch.zeros(shape)
        else:
            std = args.init_method_std
            if is_output_projection(name):
                std /= math.sqrt(2.0 * args.num_layers)
            full = torch.empty(shape).normal_(0.0, std, generator=seeded_generator(args.seed, layer_index, name))
        param.copy_(shard(full, param).to(param.dtype))
