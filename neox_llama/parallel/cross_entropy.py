"""Cross-entropy over logits whose vocabulary is split across tensor-parallel ranks (never gathered).

Collective device: the reductions run on the logits' device (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dtype = logits.dtype
        logits = logits.float()
        per_rank = logits.shape[-1]
        start = dist.get_rank(group) * per_rank
        peak = logits.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak[..., None]
        outside = (labels < start) | (labels >= start + per_rank)
        local = torch.where(outside, torch.zeros_like(labels), labels - start)
        target = shifted.gather(-1, local[..., None]).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target, group=group)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        ctx.save_for_backward(exp / total[..., None], local, outside)
        return total.log() - target

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local[..., None], -(~outside).float()[..., None])
        return (grad_logits * grad[..., None]).to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Per-token cross-entropy (float32) from this rank's vocabulary slice of the logits."""
    return _VocabParallelCrossEntropy.apply(logits, labels, group)
