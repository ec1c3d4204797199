"""A checkpoint as a language model to score text with: loaded once, batched, on one device.

:class:`LanguageModel` loads a checkpoint (a LoRA checkpoint, or a base with ``adapters``, merged as
tools/merge_lora.py merges them) through :mod:`neox_llama.checkpoint` and scores token sequences in padded
batches (right padding; causal attention, so padding never reaches a real token). Evaluation is built on it;
a checkpoint trained with any pipeline/tensor layout is scored on one process from its layout-free weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neox_llama.checkpoint.run import Run, load_model, load_run
from neox_llama.errors import NeoxLlamaError
from neox_llama.generation.settings import GenerationSettings
from neox_llama.model.llama import Llama


def _default_stops(tokenizer) -> set[int]:
    stops = {tokenizer.eos_id} if tokenizer is not None and tokenizer.eos_id is not None else set()
    if getattr(tokenizer, "eot_id", None) is not None:
        stops.add(tokenizer.eot_id)
    return stops


@dataclass
class Window:
    """Token ids to run and the position from which their log-probabilities count (context before it)."""

    ids: list[int]
    first_scored: int
    """Index in ``ids`` of the first token whose log-probability is summed (>= 1: it needs a token before it)."""


def sliding_windows(ids: Sequence[int], seq_length: int, stride: int) -> list[Window]:
    """Hugging Face's perplexity recipe: windows of ``seq_length`` starting every ``stride`` tokens, each scoring
    only the tokens the previous window did not; the first token of the text has no context and is not scored
    (with ``stride == seq_length`` neither is each window's first token)."""
    if seq_length < 2 or not 0 < stride <= seq_length:
        raise ValueError(f"need seq_length >= 2 and 0 < stride <= seq_length (got {seq_length}, {stride})")
    windows, prev_end = [], 0
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + seq_length, len(ids))
        first = max(prev_end, begin + 1) - begin
        if end - begin >= 2 and first < end - begin:
            windows.append(Window(list(ids[begin:end]), first))
        prev_end = end
        if end == len(ids):
            break
    return windows


class LanguageModel:
    """A checkpoint's model and tokenizer, ready to score token sequences."""

    def __init__(self, model: Llama, run: Run, device: str = "cpu"):
        self.model, self.run, self.device = model.eval().to(device), run, device
        self.tokenizer = run.tokenizer
        self.bank = None
        """An :class:`~neox_llama.generation.adapter_bank.AdapterBank`: LoRA adapters applied per row."""

    @classmethod
    def from_checkpoint(cls, path: str, adapters: list[str] | None = None, base: str | None = None,
                        device: str | None = None, dtype: torch.dtype | None = None) -> LanguageModel:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, run = load_model(load_run(path, adapters, base=base), device, dtype)
        return cls(model, run, device)

    @property
    def is_reward_model(self) -> bool:
        """A score head instead of the vocabulary head: it scores sequences, it does not predict tokens."""
        return bool(self.run.args.num_labels)

    def require_language_model(self, what: str) -> None:
        """One clear error where a reward model is asked for what only a language model does."""
        if self.is_reward_model:
            raise NeoxLlamaError(f"{self.run.folder} is a reward model (a score head, no vocabulary head): it cannot "
                                 f"{what}; score pairs with it (tools/evaluate.py --preference-data)")

    @property
    def max_length(self) -> int:
        return self.run.args.max_position_embeddings

    @torch.no_grad()
    def token_logprobs(self, sequences: Sequence[Sequence[int]], with_greedy: bool = False) -> list:
        """For each sequence, the float32 log-probability of every token after the first given those before it;
        ``with_greedy``: (log-probabilities, whether each token is the most likely one) per sequence."""
        if not sequences:
            return []
        longest = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), longest, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        ids = ids.to(self.device)
        logits = self.model(ids[:, :-1])[..., : self.run.true_vocab].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
        rows = [logprobs[row, : len(seq) - 1] for row, seq in enumerate(sequences)]
        if not with_greedy:
            return rows
        greedy = (logits.argmax(dim=-1) == ids[:, 1:]).cpu()
        return [(rows[row], greedy[row, : len(seq) - 1]) for row, seq in enumerate(sequences)]

    # ------------------------------------------------------------------ generation
    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks())

    def default_stops(self) -> set[int]:
        """The ids that end generation when a request names none: end of sequence (and Llama-3's end of turn)."""
        return _default_stops(self.tokenizer)

    def last_logits(self, ids: torch.Tensor, positions: torch.Tensor, views: list,
                    adapters: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last position of each row, the blocks reading and writing ``views`` (one KV cache per
        block); ``adapters``: each row's index in :attr:`bank` (0 = the base model)."""
        return self.cached_logits(ids, positions, views, adapters)[:, -1]

    def cached_logits(self, ids: torch.Tensor, positions: torch.Tensor, views: list,
                      adapters: torch.Tensor | None = None, *, last_only: bool = True) -> torch.Tensor:
        """Logits over the true vocabulary [rows, positions (1 with ``last_only``), vocab], as :meth:`last_logits`."""
        if self.bank is not None:
            self.bank.select(adapters)
        try:
            return self.model(ids, positions, views, last_only=last_only)[..., : self.run.true_vocab]
        finally:
            if self.bank is not None:
                self.bank.select(None)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], settings: Sequence[GenerationSettings],
                 stop_ids: set[int] | None = None, adapters: Sequence[int] | None = None) -> list[list[int]]:
        """New ids for every prompt, decoded together (:class:`~neox_llama.generation.batch.DecodingBatch`): each
        prompt is prefilled alone into its own cache slot, then all unfinished rows take one step at a time (each
        with its own sampling settings, seed, length, stop conditions and adapter; a stop id is not included)."""
        from neox_llama.generation.batch import DecodingBatch

        if len(prompts) != len(settings):
            raise ValueError("one GenerationSettings per prompt")
        adapters = list(adapters) if adapters is not None else [0] * len(prompts)
        batch = DecodingBatch(self, len(prompts), capacity=min(
            self.max_length, max(len(p) + s.max_new_tokens for p, s in zip(prompts, settings, strict=True))))
        for prompt in prompts:
            batch.check(prompt)
        rows = [batch.add(p, s, stop_ids, a) for p, s, a in zip(prompts, settings, adapters, strict=True)]
        while batch.running:
            batch.step()
        return [row.output for row in rows]

    @torch.no_grad()
    def generate_one(self, prompt: Sequence[int], settings: GenerationSettings,
                     on_token: Callable[[int], None] | None = None, stop_ids: set[int] | None = None) -> list[int]:
        """New ids for one prompt, each passed to ``on_token`` as soon as it is chosen (streaming)."""
        from neox_llama.generation.batch import DecodingBatch

        batch = DecodingBatch(self, 1, capacity=min(self.max_length, len(prompt) + settings.max_new_tokens))
        batch.check(prompt)
        row = batch.add(prompt, settings, stop_ids)
        while batch.running:
            for _, token in batch.step():
                if token is not None and on_token is not None:
                    on_token(token)
        return row.output

    def score_windows(self, windows: Sequence[Window], batch_size: int = 8) -> tuple[float, int]:
        """(sum of negative log-likelihoods in nats, number of scored tokens) over ``windows``, in batches."""
        total, count = 0.0, 0
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            for window, logprobs in zip(chunk, self.token_logprobs([w.ids for w in chunk]), strict=True):
                scored = logprobs[window.first_scored - 1:]  # logprobs[k] is token k + 1
                total -= float(scored.double().sum())
                count += scored.numel()
        return total, count
