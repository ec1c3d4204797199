"""Batch-1 generation with a KV cache (prefill the prompt once, then one token per step): the plain reference the
batched facade (:class:`~neox_llama.generation.language_model.LanguageModel`) is tested against, and the settings
every generation path shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neox_llama.checkpoint.run import Run, load_model, load_run
from neox_llama.errors import NeoxLlamaError
from neox_llama.generation.sampling import next_token
from neox_llama.model.kv_cache import KVCache
from neox_llama.model.layers import TransformerBlock
from neox_llama.model.llama import LlamaStack


class GenerationError(NeoxLlamaError):
    """A request generation cannot serve (empty prompt, prompt longer than the context)."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_ids: set[int] = field(default_factory=set)
    stop_strings: list[str] = field(default_factory=list)


class Generator:
    """A model and tokenizer ready to continue prompts."""

    def __init__(self, model: LlamaStack, ckpt: Run, device: str = "cpu"):
        self.model, self.ckpt, self.device = model.eval().to(device), ckpt, device
        layers = list(model.children())
        self.embedding, self.head = layers[0], layers[-1]
        self.blocks = [m for m in layers if isinstance(m, TransformerBlock)]
        self.final_norm = layers[-2]
        self.tokenizer = ckpt.tokenizer

    @classmethod
    def from_checkpoint(cls, path: str, device: str | None = None, dtype: torch.dtype | None = None,
                        adapters: list[str] | None = None, base: str | None = None) -> Generator:
        """The model of checkpoint ``path`` (a LoRA checkpoint: its base with it merged), with ``adapters``
        (LoRA checkpoints trained on ``path``) merged in as tools/merge_lora.py merges them; ``base``: where a LoRA
        checkpoint's base is now."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, run = load_model(load_run(path, adapters, base=base), device, dtype)
        return cls(model, run, device)

    def default_stops(self) -> set[int]:
        tok = self.tokenizer
        stops = {tok.eos_id} if tok is not None and tok.eos_id is not None else set()
        if getattr(tok, "eot_id", None) is not None:
            stops.add(tok.eot_id)
        return stops

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor, start: int, caches: list[KVCache] | None) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand_as(ids)
        hidden, positions = self.embedding((ids, positions))
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks), strict=True):
            hidden, positions = block((hidden, positions), cache)
        return self.head(self.final_norm((hidden, positions)))[..., : self.ckpt.true_vocab]

    def _caches(self, capacity: int) -> list[KVCache]:
        a, dtype = self.ckpt.args, next(self.model.parameters()).dtype
        return [KVCache(1, a.num_kv_heads, capacity, a.head_dim, dtype, self.device) for _ in self.blocks]

    @torch.no_grad()
    def generate_ids(self, prompt: list[int], settings: GenerationSettings, use_cache: bool = True,
                     on_token: Callable[[int], None] | None = None) -> list[int]:
        """New token ids after ``prompt`` (stopping at a stop id, which is not included, or a stop string)."""
        if not prompt:
            raise GenerationError("the prompt is empty")
        limit = self.ckpt.args.max_position_embeddings
        budget = min(settings.max_new_tokens, limit - len(prompt))
        if budget <= 0:
            raise GenerationError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
        gen = torch.Generator().manual_seed(settings.seed)
        stops = settings.stop_ids or self.default_stops()
        ids = torch.tensor([prompt], device=self.device)
        caches = self._caches(len(prompt) + budget) if use_cache else None
        logits = self._logits(ids, 0, caches)[0, -1]
        out: list[int] = []
        for _ in range(budget):
            token = next_token(logits.cpu(), settings.temperature, settings.top_k, settings.top_p, gen)
            if token in stops:
                break
            out.append(token)
            if on_token:
                on_token(token)
            if settings.stop_strings and self.tokenizer is not None:
                text = self.tokenizer.decode(out)
                if any(s in text for s in settings.stop_strings):
                    break
            if len(out) == budget:
                break  # the last token needs no logits after it
            if use_cache:
                logits = self._logits(torch.tensor([[token]], device=self.device), len(prompt) + len(out) - 1, caches)[0, -1]
            else:
                full = torch.tensor([prompt + out], device=self.device)
                logits = self._logits(full, 0, None)[0, -1]
        return out
