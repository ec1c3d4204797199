"""The plain batch-1 generation loop, kept as the reference that the batched
:class:`~neox_llama.generation.language_model.LanguageModel` is tested against (tests/test_batched_generation.py)
and timed against (benchmarks/generate.py): prefill the prompt once into a KV cache, then one token per step, each
through the model's own forward pass (or, ``use_cache=False``, the whole sequence again every step)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from neox_llama.checkpoint.run import Run, load_model, load_run
from neox_llama.generation.sampling import next_token
from neox_llama.generation.settings import GenerationError, GenerationSettings
from neox_llama.model.llama import Llama


class Generator:
    """A model and tokenizer ready to continue one prompt at a time."""

    def __init__(self, model: Llama, ckpt: Run, device: str = "cpu"):
        self.model, self.ckpt, self.device = model.eval().to(device), ckpt, device
        self.tokenizer = ckpt.tokenizer

    @classmethod
    def from_checkpoint(cls, path: str, device: str | None = None, dtype: torch.dtype | None = None,
                        adapters: list[str] | None = None, base: str | None = None) -> Generator:
        """The model of checkpoint ``path`` (with ``adapters`` merged in, as tools/merge_lora.py merges them)."""
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
    def _logits(self, ids: list[int], start: int, cache: list | None) -> torch.Tensor:
        """Logits of the last of ``ids`` placed at positions ``start``, ``start + 1``, ..."""
        ids_t = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)[None]
        return self.model(ids_t, positions, cache, last_only=True)[0, -1, : self.ckpt.true_vocab]

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
        cache = self.model.new_cache(1, len(prompt) + budget) if use_cache else None
        logits = self._logits(prompt, 0, cache)
        out: list[int] = []
        for _ in range(budget):
            token = next_token(logits.cpu(), settings.temperature, settings.top_k, settings.top_p, gen)
            if token in stops:
                break
            out.append(token)
            if on_token:
                on_token(token)
            if settings.stop_strings and self.tokenizer is not None:
                if any(s in self.tokenizer.decode(out) for s in settings.stop_strings):
                    break
            if len(out) == budget:
                break  # the last token needs no logits after it
            if use_cache:
                logits = self._logits([token], len(prompt) + len(out) - 1, cache)
            else:
                logits = self._logits(prompt + out, 0, None)
        return out
