"""Megatron-style tensor parallelism: layers that hold one rank's shard, and the collectives between them.

- column-parallel linear: weight rows (output features) split; input copied, output stays split
- row-parallel linear: weight columns (input features) split; partial outputs summed over ranks
- vocab-parallel embedding: rows split; each rank embeds the ids it owns, results summed
Attention heads (query and key/value heads alike) are split by splitting q/k/v output features,
so grouped-query attention keeps its head grouping on every rank.

Collective device: every collective here reduces activations or gradients of the model, on the model's device
(NCCL under ``cpu:gloo,cuda:nccl`` on GPUs, gloo on CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neox_llama.model.factory import LayerFactory, mark_partition
from neox_llama.parallel.cross_entropy import vocab_parallel_cross_entropy


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward; identity backward (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _split(total: int, size: int, what: str) -> int:
    if total % size:
        raise ValueError(f"{what} {total} is not divisible by the tensor-parallel size {size}")
    return total // size


def _sharded(param: nn.Parameter, dim: int | None, size: int, rank: int) -> nn.Parameter:
    mark_partition(param, dim, size, rank)
    # DeepSpeed counts a parameter's gradient norm once per tensor-parallel group only when this is set.
    param.model_parallel = dim is not None
    param.tensor_model_parallel = dim is not None
    return param


class ColumnParallelLinear(nn.Module):
    """``y_shard = x @ W_shard.T (+ b_shard)``, W split along output features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.group = group
        out_local = _split(out_features, size, "output features")
        self.weight = _sharded(nn.Parameter(torch.empty(out_local, in_features)), 0, size, rank)
        self.bias = _sharded(nn.Parameter(torch.zeros(out_local)), 0, size, rank) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToGroup.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = sum over ranks of x_shard @ W_shard.T (+ b)``, W split along input features."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.group = group
        in_local = _split(in_features, size, "input features")
        self.weight = _sharded(nn.Parameter(torch.empty(out_features, in_local)), 1, size, rank)
        self.bias = _sharded(nn.Parameter(torch.zeros(out_features)), None, size, rank) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ReduceFromGroup.apply(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows [start, end) live on this rank; ids elsewhere contribute zeros."""

    def __init__(self, num_embeddings: int, dim: int, group: dist.ProcessGroup):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        per_rank = _split(num_embeddings, size, "vocabulary rows")
        self.group, self.start, self.end = group, rank * per_rank, (rank + 1) * per_rank
        self.weight = _sharded(nn.Parameter(torch.empty(per_rank, dim)), 0, size, rank)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.start)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return _ReduceFromGroup.apply(out, self.group)


class TensorParallelFactory(LayerFactory):
    """Layers sharded over ``group``; the output head yields this rank's vocabulary slice of the logits."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.tp_size, self.tp_rank = dist.get_world_size(group), dist.get_rank(group)

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, bias, self.group)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return RowParallelLinear(in_features, out_features, bias, self.group)

    def vocab_embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, dim, self.group)

    def parameter(self, shape: tuple[int, ...], dim: int | None, device=None, dtype=None) -> nn.Parameter:
        local = list(shape)
        if dim is not None:
            local[dim] = _split(shape[dim], self.tp_size, "adapter features")
        return _sharded(nn.Parameter(torch.empty(local, device=device, dtype=dtype)), dim, self.tp_size, self.tp_rank)

    def splits_output(self, linear: nn.Module) -> bool:
        return isinstance(linear, ColumnParallelLinear)

    def summed_over_group(self, tensor: torch.Tensor) -> torch.Tensor:
        return _CopyToGroup.apply(tensor, self.group)

    def reduced_over_group(self, tensor: torch.Tensor) -> torch.Tensor:
        return _ReduceFromGroup.apply(tensor, self.group)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return _CopyToGroup.apply(hidden, self.group)

    def token_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.group)

    def __getstate__(self):  # process groups do not pickle; a factory is only used where it was made
        raise TypeError("TensorParallelFactory holds a process group and cannot be pickled")
