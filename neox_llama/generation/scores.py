"""Token log-probabilities as OpenAI-style APIs report them: each token's own and its most likely alternatives.

They are the model's own distribution (float32 ``log_softmax`` of the logits over the true vocabulary), whatever
temperature, top-k or top-p a request samples with, as :meth:`LanguageModel.token_logprobs
<neox_llama.generation.language_model.LanguageModel.token_logprobs>` computes them for ``tools/evaluate.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenScore:
    """One token's log-probability and the ``k`` most likely tokens at its position (most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def score_tokens(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenScore]:
    """Scores of ``tokens[i]`` under ``logits[i]`` ([n, vocab]) with their ``k`` best alternatives each.

    The chosen token's value and its alternatives' come from the same tensor, so a token that is the most likely
    one has exactly the best alternative's value (what harnesses compare to call a continuation greedy)."""
    if not len(tokens):
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(list(tokens), dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(-1, ids[:, None])[:, 0].tolist()
    if k:
        values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        top = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        top = [[] for _ in chosen]
    return [TokenScore(int(t), lp, alternatives) for t, lp, alternatives in zip(tokens, chosen, top, strict=True)]
