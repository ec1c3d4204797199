"""The facade's batched generation (per-row cache slots, settings and stops) equals batch-1 generation row by row."""

from __future__ import annotations

import pytest

from benchmarks.reference_generator import Generator
from neox_llama.generation.language_model import LanguageModel
from neox_llama.generation.settings import GenerationError, GenerationSettings

PROMPTS = ["It was the best", "Document 3: it was the age of wisdom, it was", "the"]


def test_batched_generation_equals_one_prompt_at_a_time(eval_checkpoint):
    checkpoint = eval_checkpoint  # the session's evaluation checkpoint folder (conftest)
    lm = LanguageModel.from_checkpoint(str(checkpoint / "ck"), device="cpu")
    single = Generator(lm.model, lm.run, "cpu")
    tok = lm.tokenizer
    prompts = [tok.encode_document(p) for p in PROMPTS]
    settings = [GenerationSettings(max_new_tokens=12), GenerationSettings(max_new_tokens=5, temperature=0.9, top_k=20,
                                                                          seed=3),
                GenerationSettings(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=11)]
    batched = lm.generate(prompts, settings)
    assert [len(o) for o in batched] == [12, 5, 9]
    for prompt, s, got in zip(prompts, settings, batched, strict=True):
        assert got == single.generate_ids(prompt, s)
    stop = tok.decode(batched[0])[:3]  # a stop string that the first row reaches early
    halted = lm.generate(prompts[:1], [GenerationSettings(max_new_tokens=12, stop_strings=[stop])])[0]
    assert halted == single.generate_ids(prompts[0], GenerationSettings(max_new_tokens=12, stop_strings=[stop]))
    assert len(halted) < 12
    with pytest.raises(GenerationError, match="the model's context is 64"):
        lm.generate([list(range(3, 70))], [GenerationSettings()])
