"""Many adapters on one base: rows of one batch that use different LoRA checkpoints (different ranks and targets)
each generate what their own merged model generates, and the base rows what the base generates."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import save_random_checkpoint
from helpers.lora import UNTIED, adapter_checkpoint

from neox_llama.checkpoint.paths import CheckpointError
from neox_llama.generation.adapter_bank import AdapterBank
from neox_llama.generation.language_model import LanguageModel
from neox_llama.generation.settings import GenerationSettings
from neox_llama.peft.lora import LoraSettings

PROMPTS = [[1, 5, 9, 20], [1, 33, 7], [1, 64, 100, 3, 8, 2], [1, 12]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    save_random_checkpoint(root / "base", UNTIED)
    adapter_checkpoint(root / "a", root / "base", LoraSettings(3, 7.0, 0.0, ("query", "value", "head")), seed=1)
    adapter_checkpoint(root / "b", root / "base", LoraSettings(5, 4.0, 0.0, ("query", "key", "output", "mlp")), seed=2)
    save_random_checkpoint(root / "other", UNTIED, seed=9)
    return root


def test_rows_of_one_batch_each_use_their_own_adapter(folders):
    # query is adapted by both, at ranks 3 and 5: the bank pads the smaller rank with zeros
    lm = LanguageModel.from_checkpoint(str(folders / "base"), device="cpu")
    AdapterBank.attach(lm, {"a": str(folders / "a"), "b": str(folders / "b")})
    which = [1, 0, 2, 1]
    settings = [GenerationSettings(max_new_tokens=10) for _ in PROMPTS]
    batched = lm.generate(PROMPTS, settings, adapters=which)
    base = LanguageModel.from_checkpoint(str(folders / "base"), device="cpu")
    merged = {1: LanguageModel.from_checkpoint(str(folders / "a"), device="cpu"),
              2: LanguageModel.from_checkpoint(str(folders / "b"), device="cpu")}
    for prompt, k, got in zip(PROMPTS, which, batched, strict=True):
        alone = (merged[k] if k else base).generate([prompt], [GenerationSettings(max_new_tokens=10)])[0]
        assert got == alone
    assert len({tuple(o) for o in batched[:3]}) == 3  # the adapters really change the output
    ids = torch.tensor([PROMPTS[2]])
    lm.bank.select(torch.tensor([2]))
    with torch.no_grad():
        per_row = lm.model(ids)
    lm.bank.select(None)
    torch.testing.assert_close(per_row, merged[2].model(ids), rtol=1e-4, atol=1e-5)


def test_an_adapter_of_another_base_is_refused(folders):
    lm = LanguageModel.from_checkpoint(str(folders / "other"), device="cpu")
    with pytest.raises(CheckpointError, match="fingerprint"):
        AdapterBank.attach(lm, {"a": str(folders / "a")})
    with pytest.raises(CheckpointError, match="not an adapter checkpoint"):
        AdapterBank.attach(lm, {"x": str(folders / "base")})
