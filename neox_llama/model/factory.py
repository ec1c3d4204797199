"""Where the model gets its linear and embedding layers, and how a parameter records which shard it holds.

The model asks a factory for a *column* layer (output features may be split across tensor-parallel
ranks), a *row* layer (input features split, results summed) or a *vocab* embedding (rows split).
On one device these are plain ``nn.Linear`` / ``nn.Embedding``; neox_llama.parallel supplies a
factory whose layers hold one rank's shard. The model code is the same either way. A factory knows parallel
layers only: adapters (neox_llama/peft/lora.py, adapter.py) ask it for parameters and collectives.

Every parameter records how it is sharded (``partition_dim``, ``tp_size``, ``tp_rank``): initialisation, adapters
and checkpoints read that record through the helpers here (``full_shape``, ``shard``, ``held_numel``).
"""

from __future__ import annotations

import torch
from torch import nn

from neox_llama.model.cross_entropy import token_cross_entropy


def mark_partition(param: nn.Parameter, dim: int | None, tp_size: int, tp_rank: int) -> nn.Parameter:
    """Record how ``param`` is sharded (``dim`` None = replicated), for initialisation and checkpoints."""
    param.partition_dim = dim
    param.tp_size = tp_size
    param.tp_rank = tp_rank
    return param


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


class LayerFactory:
    """Single-device layers. Subclasses shard them over a tensor-parallel group."""

    tp_size: int = 1
    tp_rank: int = 0

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """A linear layer whose output features may be split across ranks."""
        layer = nn.Linear(in_features, out_features, bias=bias)
        mark_partition(layer.weight, None, 1, 0)
        if bias:
            mark_partition(layer.bias, None, 1, 0)
        return layer

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """A linear layer whose input features may be split across ranks (outputs summed)."""
        return self.column(in_features, out_features, bias)

    def vocab_embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """The token embedding; its rows (the vocabulary) may be split across ranks."""
        layer = nn.Embedding(num_embeddings, dim)
        mark_partition(layer.weight, None, 1, 0)
        return layer

    def parameter(self, shape: tuple[int, ...], dim: int | None, device=None, dtype=None) -> nn.Parameter:
        """A new (uninitialised) parameter of full shape ``shape``, holding this rank's piece split along ``dim``
        (None: replicated); adapters use it."""
        return mark_partition(nn.Parameter(torch.empty(shape, device=device, dtype=dtype)), None, 1, 0)

    def splits_output(self, linear: nn.Module) -> bool:
        """Whether ``linear`` (a layer this factory made) holds only some of its output features."""
        return False

    def summed_over_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (replicated) as used on this rank's shard of the work: its gradient is summed over the group."""
        return tensor

    def reduced_over_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the group of each rank's partial ``tensor`` (what a row-parallel layer does to its output)."""
        return tensor

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """Prepare the hidden state for a (possibly vocab-split) output projection."""
        return hidden

    def token_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy in float32 (logits may be one rank's vocabulary shard); chunked, so no float32
        copy of the whole batch's logits is made (neox_llama/model/cross_entropy.py)."""
        return token_cross_entropy(logits, labels)


SINGLE_DEVICE = LayerFactory()
