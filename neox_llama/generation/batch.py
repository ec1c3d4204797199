"""Decoding many sequences together: per-sequence KV-cache slots, and a batch that sequences join and leave.

A new sequence is prefilled alone into a free slot of a :class:`SlotCache` (one per attention layer); then every
running sequence advances one token per :meth:`DecodingBatch.step`, each attending only to its own positions, with
its own sampling settings, seed, budget, stop ids and stop strings, and (with an adapter bank) its own LoRA
adapter. Sequences may be added between any two steps and leave as soon as they finish or are cancelled, which is
continuous batching: :meth:`LanguageModel.generate <neox_llama.generation.language_model.LanguageModel.generate>`
adds all its prompts and steps until they finish; the server adds requests as they arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neox_llama.generation.sampling import next_token
from neox_llama.generation.scores import TokenScore, score_tokens
from neox_llama.generation.settings import GenerationError, GenerationSettings, check_prompt_length


class SlotCache:
    """One attention layer's keys and values for several independent sequences ("slots") of different lengths."""

    def __init__(self, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.keys = torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)

    def prefill(self, slot: int) -> _Prefill:
        return _Prefill(self, slot)

    def decode(self, slots: torch.Tensor) -> _Decode:
        return _Decode(self, slots)


class _Prefill:
    """The KV-cache interface attention calls (``append``) for one slot's prompt: plain causal attention."""

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def append(self, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[2]
        if n > self.cache.keys.shape[2]:
            raise ValueError(f"the prompt has {n} tokens; the cache holds {self.cache.keys.shape[2]}")
        self.cache.keys[self.slot, :, :n] = k[0]
        self.cache.values[self.slot, :, :n] = v[0]
        self.cache.lengths[self.slot] = n
        return k, v, None


class _Decode:
    """One new token for each of ``slots``: stored at each slot's own length; attention masked to its positions."""

    def __init__(self, cache: SlotCache, slots: torch.Tensor):
        self.cache, self.slots = cache, slots

    def append(self, k: torch.Tensor, v: torch.Tensor):
        c, rows = self.cache, self.slots
        at = c.lengths[rows]
        if int(at.max()) >= c.keys.shape[2]:
            raise ValueError(f"KV cache holds {c.keys.shape[2]} positions per slot")
        c.keys[rows, :, at] = k[:, :, 0]
        c.values[rows, :, at] = v[:, :, 0]
        c.lengths[rows] = at + 1
        longest = int(at.max()) + 1  # attend over the filled positions only, not the whole capacity
        mask = torch.arange(longest, device=k.device)[None, :] < c.lengths[rows][:, None]
        return c.keys[rows, :, :longest], c.values[rows, :, :longest], mask[:, None, None, :]


@dataclass(eq=False)
class DecodedSequence:
    """One sequence in a :class:`DecodingBatch`: its prompt, settings and what it has generated so far."""

    prompt: list[int]
    settings: GenerationSettings
    stops: set[int]
    budget: int
    """At most this many new tokens (``max_new_tokens``, cut to what the context leaves)."""
    adapter: int = 0
    """Index in the model's adapter bank (0: the base model)."""
    slot: int = -1
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running; ``stop`` (a stop id or stop string), ``length`` (the budget) or ``cancelled``."""
    generator: torch.Generator | None = None
    logits: torch.Tensor | None = None
    """The next token's logits, waiting to be sampled at the next step."""
    prompt_scores: list[TokenScore] | None = None
    """With ``settings.prompt_logprobs``: the scores of the prompt's tokens after the first (from its prefill)."""
    scores: list[TokenScore] = field(default_factory=list)
    """With ``settings.logprobs``: one score per sampled token, a stop id included (it is not in ``output``)."""


class DecodingBatch:
    """Up to ``slots`` sequences decoded together by one :class:`LanguageModel`, each in its own cache slot."""

    def __init__(self, lm, slots: int, capacity: int | None = None):
        a, dtype = lm.run.args, next(lm.model.parameters()).dtype
        self.lm, self.capacity = lm, capacity or lm.max_length
        self.caches = [SlotCache(slots, a.num_kv_heads, self.capacity, a.head_dim, dtype, lm.device)
                       for _ in range(lm.num_blocks)]
        self.free_slots = list(range(slots - 1, -1, -1))
        self.running: list[DecodedSequence] = []

    def check(self, prompt: Sequence[int], *, generate: bool = True) -> None:
        """Raise GenerationError when ``prompt`` cannot be generated from (empty, or no room left in the context;
        without ``generate``, a prompt only scored, it may fill the context)."""
        check_prompt_length(len(prompt), min(self.lm.max_length, self.capacity), generate=generate)

    @torch.no_grad()
    def add(self, prompt: Sequence[int], settings: GenerationSettings, stop_ids: set[int] | None = None,
            adapter: int = 0) -> DecodedSequence:
        """Prefill ``prompt`` into a free slot; it takes its first step with the others at the next :meth:`step`.

        With ``settings.prompt_logprobs`` the prefill keeps every position's logits and scores the prompt (one
        forward pass, as for any prompt); with ``max_new_tokens`` 0 the sequence ends there (``length``) and
        never joins the running batch."""
        self.check(prompt, generate=settings.max_new_tokens > 0)
        if not self.free_slots:
            raise GenerationError("every decoding slot is busy")
        budget = min(settings.max_new_tokens, min(self.lm.max_length, self.capacity) - len(prompt))
        stops = settings.stop_ids or (stop_ids if stop_ids is not None else self.lm.default_stops())
        seq = DecodedSequence(list(prompt), settings, stops, budget, adapter,
                              generator=torch.Generator().manual_seed(settings.seed))
        seq.slot = self.free_slots.pop()
        try:
            ids = torch.tensor([seq.prompt], device=self.lm.device)
            positions = torch.arange(len(prompt), device=self.lm.device)[None]
            views = [c.prefill(seq.slot) for c in self.caches]
            scored = settings.prompt_logprobs is not None
            logits = self.lm.cached_logits(ids, positions, views, torch.tensor([adapter]), last_only=not scored)[0]
            if scored:
                seq.prompt_scores = score_tokens(logits[:-1], seq.prompt[1:], settings.prompt_logprobs)
            seq.logits = logits[-1]
        except BaseException:
            self.free_slots.append(seq.slot)
            raise
        self.running.append(seq)
        if budget <= 0:
            self._finish(seq, "length")
        return seq

    def cancel(self, seq: DecodedSequence) -> None:
        """Stop ``seq`` now and free its slot (a client that went away)."""
        if seq in self.running:
            self._finish(seq, "cancelled")

    def _finish(self, seq: DecodedSequence, reason: str) -> None:
        seq.finish_reason, seq.logits = reason, None
        self.running.remove(seq)
        self.free_slots.append(seq.slot)

    def _sample(self, seq: DecodedSequence) -> int | None:
        """Take ``seq``'s next token (None: it stopped on a stop id); finishes it when it is done."""
        s = seq.settings
        token = next_token(seq.logits.cpu(), s.temperature, s.top_k, s.top_p, seq.generator)
        if s.logprobs is not None:
            seq.scores += score_tokens(seq.logits[None], [token], s.logprobs)
        if token in seq.stops:
            self._finish(seq, "stop")
            return None
        seq.output.append(token)
        stops = [stop for stop in s.stop_strings if stop]
        if stops and self.lm.tokenizer is not None and any(stop in self.lm.tokenizer.decode(seq.output)
                                                          for stop in stops):
            self._finish(seq, "stop")
        elif len(seq.output) >= seq.budget:
            self._finish(seq, "length")
        return token

    @torch.no_grad()
    def step(self) -> list[tuple[DecodedSequence, int | None]]:
        """One token for every running sequence: ``(sequence, new token or None)`` for each; a sequence whose
        ``finish_reason`` is set has left the batch (a stop id is not part of the output; a stop string is)."""
        events = [(seq, self._sample(seq)) for seq in list(self.running)]
        if self.running:
            live = self.running
            slots = torch.tensor([s.slot for s in live], device=self.lm.device)
            ids = torch.tensor([[s.output[-1]] for s in live], device=self.lm.device)
            positions = self.caches[0].lengths[slots][:, None]
            logits = self.lm.last_logits(ids, positions, [c.decode(slots) for c in self.caches],
                                         torch.tensor([s.adapter for s in live]))
            for row, seq in enumerate(live):
                seq.logits = logits[row]
        return events
