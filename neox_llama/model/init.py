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
from neox_llama.model.norms import LayerNorm, RMSNorm
from neox_llama.model.specs import is_output_projection


def _generator(seed: int, layer_index: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{layer_index}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The unsharded shape of ``param`` (a ZeRO-3 partitioned parameter: the shape it has when gathered)."""
    shape = list(getattr(param, "ds_shape", param.shape))
    dim = getattr(param, "partition_dim", None)
    if dim is not None:
        shape[dim] *= getattr(param, "tp_size", 1)
    return tuple(shape)


def held_numel(param: nn.Parameter) -> int:
    """Elements of ``param`` on this rank before ZeRO-3 partitioning (its tensor-parallel shard)."""
    return getattr(param, "ds_numel", param.numel())


def shard(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """This rank's piece of ``full`` for ``param``."""
    dim = getattr(param, "partition_dim", None)
    if dim is None:
        return full
    return full.chunk(param.tp_size, dim=dim)[param.tp_rank]


@torch.no_grad()
def init_weights(layer: nn.Module, layer_index: int, args: LlamaArgs) -> None:
    """Initialise one layer: normal(0, std) matrices (output projections std / sqrt(2 x layers)),
    zero biases, unit norm weights."""
    norm_params = {id(p) for m in layer.modules() if isinstance(m, (RMSNorm, LayerNorm)) for p in m.parameters()}
    for name, param in layer.named_parameters():
        shape = full_shape(param)
        if id(param) in norm_params:
            full = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            full = torch.zeros(shape)
        else:
            std = args.init_method_std
            if is_output_projection(name):
                std /= math.sqrt(2.0 * args.num_layers)
            full = torch.empty(shape).normal_(0.0, std, generator=_generator(args.seed, layer_index, name))
        param.copy_(shard(full, param).to(param.dtype))
