"""A checkpoint as a language model to score text with: loaded once, batched, on one device.

:class:`LanguageModel` loads a checkpoint (a LoRA checkpoint, or a base with ``adapters``, merged as
tools/merge_lora.py merges them) through :mod:`neox_llama.checkpoint` and scores token sequences in padded
batches (right padding; causal attention, so padding never reaches a real token). Evaluation is built on it;
a checkpoint trained with any pipeline/tensor layout is scored on one process from its layout-free weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neox_llama.checkpoint.run import Run, load_model, load_run
from neox_llama.generation.generator import GenerationSettings
from neox_llama.generation.sampling import next_token
from neox_llama.model.layers import TransformerBlock
from neox_llama.model.llama import LlamaStack


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

    def __init__(self, model: LlamaStack, run: Run, device: str = "cpu"):
        self.model, self.run, self.device = model.eval().to(device), run, device
        self.tokenizer = run.tokenizer

    @classmethod
    def from_checkpoint(cls, path: str, adapters: list[str] | None = None, base: str | None = None,
                        device: str | None = None, dtype: torch.dtype | None = None) -> LanguageModel:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, run = load_model(load_run(path, adapters, base=base), device, dtype)
        return cls(model, run, device)

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
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, views: list) -> torch.Tensor:
        """Logits of the last position of each row, the blocks reading and writing ``views`` (one per block)."""
        layers = list(self.model.children())
        blocks = [m for m in layers if isinstance(m, TransformerBlock)]
        hidden, positions = layers[0]((ids, positions))
        for block, view in zip(blocks, views, strict=True):
            hidden, positions = block((hidden, positions), view)
        return layers[-1](layers[-2]((hidden[:, -1:], positions)))[:, -1, : self.run.true_vocab]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], settings: Sequence[GenerationSettings],
                 stop_ids: set[int] | None = None) -> list[list[int]]:
        """New ids for every prompt, decoded together: each prompt is prefilled alone into its own cache slot,
        then all unfinished rows take one step at a time (each with its own sampling settings, seed, length and
        stop conditions; a stop id is not included)."""
        if len(prompts) != len(settings):
            raise ValueError("one GenerationSettings per prompt")
        from neox_llama.generation.generator import GenerationError

        limit = self.max_length
        budgets = []
        for prompt, s in zip(prompts, settings, strict=True):
            if not prompt:
                raise GenerationError("the prompt is empty")
            if len(prompt) >= limit:
                raise GenerationError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
            budgets.append(min(s.max_new_tokens, limit - len(prompt)))
        a, dtype = self.run.args, next(self.model.parameters()).dtype
        capacity = max(len(p) + b for p, b in zip(prompts, budgets, strict=True))
        blocks = sum(isinstance(m, TransformerBlock) for m in self.model.children())
        caches = [SlotCache(len(prompts), a.num_kv_heads, capacity, a.head_dim, dtype, self.device)
                  for _ in range(blocks)]
        default_stops = stop_ids if stop_ids is not None else _default_stops(self.tokenizer)
        gens = [torch.Generator().manual_seed(s.seed) for s in settings]
        last = []
        for slot, prompt in enumerate(prompts):
            ids = torch.tensor([list(prompt)], device=self.device)
            positions = torch.arange(len(prompt), device=self.device)[None]
            last.append(self._forward(ids, positions, [c.prefill(slot) for c in caches])[0])
        logits = dict(enumerate(last))
        outputs: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        while active:
            stepping = []
            for row in active:
                s = settings[row]
                token = next_token(logits[row].cpu(), s.temperature, s.top_k, s.top_p, gens[row])
                if token in (s.stop_ids or default_stops):
                    continue
                outputs[row].append(token)
                if len(outputs[row]) >= budgets[row]:
                    continue
                if s.stop_strings and self.tokenizer is not None and any(
                        stop in self.tokenizer.decode(outputs[row]) for stop in s.stop_strings):
                    continue
                stepping.append(row)
            active = stepping
            if not active:
                break
            rows = torch.tensor(active, device=self.device)
            ids = torch.tensor([[outputs[r][-1]] for r in active], device=self.device)
            positions = caches[0].lengths[rows][:, None]
            step = self._forward(ids, positions, [c.decode(rows) for c in caches])
            logits = {row: step[i] for i, row in enumerate(active)}
        return outputs

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


class SlotCache:
    """One attention layer's keys and values for several independent sequences ("slots") of different lengths.

    A new sequence is prefilled alone into its slot (:meth:`prefill`); then every running slot advances one
    token per step together (:meth:`decode`), each attending to its own first ``length`` positions. This is what
    lets requests join a running batch at a step boundary (continuous batching).
    """

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
        mask = torch.arange(c.keys.shape[2], device=k.device)[None, :] < c.lengths[rows][:, None]
        return c.keys[rows], c.values[rows], mask[:, None, None, :]
