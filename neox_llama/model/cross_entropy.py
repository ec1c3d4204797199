"""Per-token cross-entropy that never holds float32 logits (or their softmax) for the whole batch.

``F.cross_entropy(logits.float(), ...)`` keeps a float32 copy of the logits and their log-softmax for backward
and writes a third [tokens, vocab] tensor (plus a zero fill) in backward. Here the forward pass reads the logits
in chunks of rows, each upcast alone, and keeps nothing but the logits themselves; backward recomputes each
chunk's softmax and writes the gradient straight into one tensor of the logits' dtype. Same values as
``F.cross_entropy`` in float32 (tests/test_cross_entropy.py).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22
"""Logits handled at once (16 MB in float32): rows per chunk = this // vocabulary."""


def _rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class ChunkedCrossEntropy(torch.autograd.Function):
    """``-log softmax(logits)[label]`` per row of ``logits`` [tokens, vocab]; labels [tokens] in range."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = _rows(logits.shape[1])
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part = logits[start:start + rows].float()
            picked = part.gather(1, labels[start:start + rows, None]).squeeze(1)
            out[start:start + rows] = torch.logsumexp(part, dim=1) - picked
        ctx.save_for_backward(logits, labels)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels = ctx.saved_tensors
        rows = _rows(logits.shape[1])
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            probs = torch.softmax(logits[start:end].float(), dim=1)
            probs.scatter_add_(1, labels[start:end, None], torch.full_like(probs[:, :1], -1.0))
            probs.mul_(grad[start:end, None])
            grad_logits[start:end] = probs
        return grad_logits, None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in float32 of ``logits`` [..., vocab] against ``labels`` [...]."""
    flat = logits.reshape(-1, logits.shape[-1])
    return ChunkedCrossEntropy.apply(flat, labels.reshape(-1)).view(labels.shape)
