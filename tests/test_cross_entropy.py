"""The chunked cross-entropy: F.cross_entropy's values and gradients, without float32 copies of the batch's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neox_llama.model import cross_entropy
from neox_llama.model.cross_entropy import token_cross_entropy


@pytest.mark.parametrize("chunk", [1 << 22, 3 * 50])  # one chunk; chunks of 3 rows, the last one short
def test_values_and_gradients_equal_torch(monkeypatch, chunk):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=gen) * 4).requires_grad_()
    labels = torch.randint(0, 50, (2, 7), generator=gen)
    weights = torch.rand(2, 7, generator=gen)
    ours = token_cross_entropy(logits, labels)
    (ours * weights).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    ref = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction="none").view(2, 7)
    (ref * weights).sum().backward()
    assert ours.dtype == torch.float32 and ours.shape == (2, 7)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_grad, logits.grad, atol=1e-7, rtol=1e-6)


def test_bf16_logits_give_float32_losses_and_bf16_gradients():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 64, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 64, (16,), generator=gen)
    ours = token_cross_entropy(logits, labels)
    ours.sum().backward()
    ref = F.cross_entropy(logits.detach().float(), labels, reduction="none")
    assert ours.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_backward_keeps_only_the_logits():
    """What autograd saves for backward: the logits (and labels), not float32 copies or a log-softmax."""
    logits = torch.randn(64, 512).bfloat16().requires_grad_()
    labels = torch.randint(0, 512, (64,))

    def saved_bytes(fn) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    ours = saved_bytes(lambda: token_cross_entropy(logits, labels))
    torch_way = saved_bytes(lambda: F.cross_entropy(logits.float(), labels, reduction="none"))
    logit_bytes = logits.numel() * logits.element_size()
    assert ours <= logit_bytes + labels.numel() * 8
    assert torch_way >= 2 * logit_bytes  # its float32 log-softmax alone is twice the bf16 logits
