"""Preference data and losses (DPO, IPO, conservative DPO, RPO's SFT term): every record format to the same ids, one
truncation rule for both sides of a pair, one-line errors per bad record; and the losses equal TRL's DPOTrainer on
our Hugging Face export with identical token ids (fp32), conservative DPO the paper's formula."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.checkpoints import save_random_checkpoint
from helpers.evaluation import SETTINGS, TEXT

from neox_llama.data.preference import (
    PreferenceDataError,
    PreferenceDataset,
    cut_pair,
    load_pairs,
    tokenize_pairs,
)
from neox_llama.generation.language_model import LanguageModel
from neox_llama.model.preference_loss import PreferenceSettings, pair_losses, response_logps
from neox_llama.tokenizers import build_tokenizer
from neox_llama.tokenizers.train import train_sentencepiece

PROMPT, GOOD, BAD = "Name the season of Light.", "It was the spring of hope.", "It was the winter."
FORMATS = {
    "strings": {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},
    "messages": {"prompt": [{"role": "user", "content": PROMPT}], "chosen": [{"role": "assistant", "content": GOOD}],
                 "rejected": {"role": "assistant", "content": BAD}},
    "conversations": {"chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}],
                      "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": BAD}]},
    "sharegpt": {"conversations": [{"from": "human", "value": PROMPT}], "chosen": {"from": "gpt", "value": GOOD},
                 "rejected": {"from": "gpt", "value": BAD}},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, two random checkpoints (policy and reference) and their fp32 exports."""
    root = tmp_path_factory.mktemp("preference")
    (root / "text.jsonl").write_text(json.dumps({"text": TEXT + PROMPT + GOOD + BAD}) + "\n")
    tokenizer = train_sentencepiece([root / "text.jsonl"], root / "tok", 320)
    from neox_llama.convert.hf_export import export_to_hf

    for name, seed in (("policy", 1), ("reference", 2)):
        save_random_checkpoint(root / name, SETTINGS, tokenizer_type="SPMTokenizer", tokenizer_file=tokenizer,
                               seed=seed)
        export_to_hf(root / name, root / f"{name}-hf", dtype="fp32")
    return root, build_tokenizer("SPMTokenizer", tokenizer)


def write(path, records):
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("style", ["alpaca", "llama2-chat"])
def test_every_format_gives_the_same_ids(world, tmp_path, style):
    _, tok = world
    got = {}
    for name, record in FORMATS.items():
        pairs, _ = load_pairs(write(tmp_path / f"{name}.json", [record]))
        [example] = tokenize_pairs(pairs, tok, style, 256, name)
        got[name] = (example.prompt.tolist(), example.chosen.tolist(), example.rejected.tolist())
    assert len(set(map(repr, got.values()))) == 1, got
    prompt, chosen, rejected = got["strings"]
    assert prompt[0] == tok.bos_id and chosen != rejected and chosen and rejected


def test_both_sides_are_cut_by_one_rule():
    prompt, chosen, rejected = [1, *range(10, 30)], list(range(100, 110)), list(range(200, 204))
    kept = cut_pair(prompt, chosen, rejected, 25, keep_first=True)
    assert kept is not None
    p, c, r = kept
    assert p[0] == 1 and p[1:] == prompt[-(len(p) - 1):]  # from the left, BOS kept; the same prompt for both
    assert len(p) + len(c) == 25 and c == chosen[:len(c)] and r == rejected  # responses from the right
    assert cut_pair([1, 2], [3] * 30, [4], 20, keep_first=True) == ([1, 2], [3] * 18, [4])
    assert cut_pair([1, 2], [3], [], 20, keep_first=True) is None


def test_a_sample_is_both_sides_and_a_batch_puts_the_chosen_first(world, tmp_path):
    _, tok = world
    pairs, _ = load_pairs(write(tmp_path / "p.json", [FORMATS["strings"], {**FORMATS["strings"], "chosen": "Yes."}]))
    examples = tokenize_pairs(pairs, tok, "alpaca", 64, "p")
    data = PreferenceDataset("train", examples, 64, 4, seed=3, pad_id=tok.eos_id)
    batch = PreferenceDataset.collate([data[0], data[1]])
    assert batch["input_ids"].shape == (4, 64)
    for row, (example, side) in enumerate([(examples[data.order[0]], "chosen"), (examples[data.order[1]], "chosen"),
                                           (examples[data.order[0]], "rejected"), (examples[data.order[1]], "rejected")]):
        response = getattr(example, side).tolist()
        trained = batch["loss_mask"][row].bool()
        assert batch["labels"][row][trained].tolist() == response
        assert batch["input_ids"][row][: len(example.prompt)].tolist() == example.prompt.tolist()


BAD_RECORDS = [
    ({"prompt": PROMPT, "chosen": GOOD}, "record 0: field 'rejected' is missing"),
    ({"prompt": PROMPT, "chosen": 3, "rejected": BAD}, "record 0: chosen must be a non-empty list of messages"),
    ({"prompt": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "x"}], "chosen": GOOD,
      "rejected": BAD}, "record 0: prompt + chosen:"),
    ({"conversations": [{"from": "robot", "value": PROMPT}], "chosen": {"from": "gpt", "value": GOOD},
      "rejected": {"from": "gpt", "value": BAD}}, "record 0: conversations[0].from 'robot' is unknown"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "record 0: chosen and rejected must share their first messages"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": GOOD}], "rejected": BAD},
     "record 0: chosen must start with an assistant message"),
    ({"prompt": "\ud800", "chosen": GOOD, "rejected": BAD}, "record 0: prompt holds"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_a_bad_record_is_one_line_naming_it(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(PreferenceDataError) as err:
        load_pairs(path)
    assert f"{path}: {message}" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- against TRL
def our_logps(lm: LanguageModel, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response's summed log-probability under ``lm`` and its token count, rows chosen first (2B)."""
    rows = [(e.prompt.tolist(), getattr(e, side).tolist()) for side in ("chosen", "rejected") for e in examples]
    sums, counts = [], []
    for prompt, response in rows:
        token_logps = lm.token_logprobs([prompt + response])[0]  # token k + 1 given the ones before it
        mask = torch.zeros_like(token_logps)
        mask[len(prompt) - 1:] = 1
        s, n = response_logps(token_logps[None], mask[None])
        sums.append(s[0])
        counts.append(n[0])
    return torch.stack(sums), torch.stack(counts)


def trl_loss(world, examples, loss_type: str, beta: float) -> float:
    """TRL's DPOTrainer loss on our exports (policy and reference) with the same ids, through its own collator."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    root, _ = world
    records = [{"prompt_ids": e.prompt.tolist(), "chosen_ids": e.chosen.tolist(), "rejected_ids": e.rejected.tolist()}
               for e in examples]
    model = AutoModelForCausalLM.from_pretrained(root / "policy-hf", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(root / "reference-hf", dtype=torch.float32)
    from transformers import AutoTokenizer

    args = DPOConfig(output_dir=str(root / "trl"), loss_type=[loss_type], beta=beta, report_to=[], use_cpu=True,
                     per_device_train_batch_size=len(records), max_length=None, bf16=False, fp16=False)
    placeholder = Dataset.from_list([{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}])  # TRL tokenises text
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=placeholder,
                         processing_class=AutoTokenizer.from_pretrained(root / "policy-hf"))  # ours: the ids below
    batch = trainer.data_collator(records)
    model.eval()
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, batch, return_outputs=False))


@pytest.fixture(scope="module")
def scored(world, tmp_path_factory):
    """Three pairs as ids, and their responses' log-probabilities under our policy and reference models."""
    root, tok = world
    folder = tmp_path_factory.mktemp("pairs")
    records = [FORMATS["strings"], {"prompt": "It was the age of", "chosen": " wisdom.", "rejected": " foolishness, "
                                    "it was the epoch of belief."}, FORMATS["sharegpt"]]
    pairs, _ = load_pairs(write(folder / "p.json", records))
    examples = tokenize_pairs(pairs, tok, "alpaca", 64, "p")
    policy, counts = our_logps(LanguageModel.from_checkpoint(str(root / "policy"), device="cpu"), examples)
    reference, _ = our_logps(LanguageModel.from_checkpoint(str(root / "reference"), device="cpu"), examples)
    return examples, policy, reference, counts


@pytest.mark.parametrize(("loss", "trl_name", "beta"), [("dpo", "sigmoid", 0.1), ("ipo", "ipo", 0.5)])
def test_the_loss_equals_trls_dpo_trainer_on_our_export(world, scored, loss, trl_name, beta):
    examples, policy, reference, counts = scored
    ours = pair_losses(policy, reference, counts, PreferenceSettings(loss, beta)).losses.mean().item()
    theirs = trl_loss(world, examples, trl_name, beta)
    assert abs(ours - theirs) <= 1e-5, (ours, theirs)
    trivial = {"dpo": math.log(2), "ipo": (1 / (2 * beta)) ** 2}[loss]  # the value when policy = reference
    assert abs(ours - trivial) > 1e-3, ours


def test_conservative_dpo_is_the_papers_formula_and_equal_models_give_ln_2(scored):
    _, policy, reference, counts = scored
    beta, eps = 0.2, 0.25
    outcome = pair_losses(policy, reference, counts, PreferenceSettings("dpo", beta, label_smoothing=eps))
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    h = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    written = -(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(1 - torch.sigmoid(h))  # Mitchell (2023)
    assert torch.allclose(outcome.losses, written, atol=1e-6)
    same = pair_losses(policy, policy, counts, PreferenceSettings("dpo", beta))
    assert torch.equal(same.losses, torch.full_like(same.losses, math.log(2)))  # policy = reference
    assert torch.equal(same.chosen_rewards, torch.zeros_like(same.chosen_rewards))
