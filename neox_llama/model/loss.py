"""Next-token loss with a per-token weight, so normalisation is exact over micro-batches and ranks.

The batch carries ``weights`` = loss mask / (valid tokens in the whole optimizer step) x (micro-batches
x data-parallel ranks); DeepSpeed's averaging over accumulation steps and ranks then cancels, and the
step's loss is the mean over every valid token of the step, not a mean of per-batch means.
"""

from __future__ import annotations

import torch

from neox_llama.model.factory import SINGLE_DEVICE, LayerFactory


def token_weights(loss_mask: torch.Tensor, valid_tokens_in_step: int | float, micro_batches_times_dp: int = 1) -> torch.Tensor:
    """Per-token weights for one micro-batch (float32)."""
    if valid_tokens_in_step <= 0:
        return torch.zeros_like(loss_mask, dtype=torch.float32)
    return loss_mask.float() * (micro_batches_times_dp / float(valid_tokens_in_step))


class CausalLMLoss:
    """``loss_fn(logits, (labels, weights))`` -> sum of weighted per-token cross-entropy."""

    def __init__(self, factory: LayerFactory = SINGLE_DEVICE):
        self.factory = factory

    def __call__(self, logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, weights = targets
        labels = torch.where(weights > 0, labels, torch.zeros_like(labels))  # masked slots may hold -100
        per_token = self.factory.token_cross_entropy(logits, labels)
        return (per_token * weights.float()).sum()
