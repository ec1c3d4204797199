"""KTO on unpaired feedback: every record format to the same ids, one-line errors per bad record, the mismatched rows
of a micro-batch, the loss equal to TRL's KTOTrainer on our export with identical token ids (fp32), and a LoRA KTO
run through deepy.py that starts at the value of policy = reference and logs TRL's KTO metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.launches import Case, register
from test_preference import PROMPT, write
from test_preference import world as world  # the module-scoped fixture, found here by pytest

from neox_llama.data.feedback import FeedbackDataset, load_feedback, tokenize_feedback
from neox_llama.data.preference import PreferenceDataError
from neox_llama.generation.language_model import LanguageModel
from neox_llama.model.preference_loss import PreferenceSettings, feedback_losses, kl_estimate, response_logps

ANSWER = "It was the spring of hope."
FORMATS = {
    "prompt-completion": {"prompt": PROMPT, "completion": ANSWER, "label": True},
    "prompt-messages": {"prompt": [{"role": "user", "content": PROMPT}],
                        "completion": [{"role": "assistant", "content": ANSWER}], "label": True},
    "messages": {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}],
                 "label": True},
    "sharegpt": {"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": ANSWER}],
                 "label": True},
}


@pytest.mark.parametrize("style", ["alpaca", "llama2-chat"])
def test_every_format_gives_the_same_ids(world, tmp_path, style):
    _, tok = world
    got = {}
    for name, record in FORMATS.items():
        records, _ = load_feedback(write(tmp_path / f"{name}.json", [record]))
        [example] = tokenize_feedback(records, tok, style, 256, name)
        got[name] = (example.prompt.tolist(), example.completion.tolist(), example.desirable)
    assert len(set(map(repr, got.values()))) == 1, got
    prompt, completion, desirable = got["messages"]
    assert prompt[0] == tok.bos_id and completion and desirable is True


BAD_RECORDS = [
    ({"prompt": PROMPT, "completion": ANSWER}, "record 0: field 'label' is missing"),
    ({"prompt": PROMPT, "completion": ANSWER, "label": 1}, "record 0: label must be true or false, not a number"),
    ({"messages": [{"role": "user", "content": PROMPT}], "label": False},
     "record 0: messages must end with the assistant answer"),
    ({"prompt": PROMPT, "label": True}, "record 0: a KTO record needs messages (or conversations), or prompt and"),
    ({"prompt": PROMPT, "completion": [{"role": "user", "content": "x"}], "label": True},
     "record 0: completion must start with an assistant message"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_a_bad_record_is_one_line_naming_it(tmp_path, record, message):
    path = write(tmp_path / "bad.json", [record])
    with pytest.raises(PreferenceDataError) as err:
        load_feedback(path)
    assert f"{path}: {message}" in str(err.value) and "\n" not in str(err.value)


def test_a_micro_batch_pairs_each_prompt_with_the_previous_completion(world, tmp_path):
    _, tok = world
    records = [{"prompt": f"Question {i}?", "completion": f"Answer number {i}.", "label": i % 2 == 0}
               for i in range(3)]
    examples = tokenize_feedback(load_feedback(write(tmp_path / "f.json", records))[0], tok, "alpaca", 64, "f")
    data = FeedbackDataset("train", examples, 64, 3, seed=1, pad_id=tok.eos_id)
    samples = [data[i] for i in range(3)]
    batch = data.collate(samples)
    assert batch["input_ids"].shape == (6, 64) and batch["desirable"].tolist() == [
        bool(examples[data.order[i]].desirable) for i in range(3)]
    for row in range(6):
        i = row % 3
        prompt = samples[i]["prompt"].tolist()
        completion = samples[i if row < 3 else i - 1]["completion"].tolist()  # the mismatched rows: i with i - 1
        trained = batch["loss_mask"][row].bool()
        assert batch["labels"][row][trained].tolist() == completion
        assert batch["input_ids"][row][: len(prompt)].tolist() == prompt


# --------------------------------------------------------------------------- against TRL
def completion_logps(lm: LanguageModel, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    sums = []
    for prompt, completion in rows:
        token_logps = lm.token_logprobs([prompt + completion])[0]
        mask = torch.zeros_like(token_logps)
        mask[len(prompt) - 1:] = 1
        sums.append(response_logps(token_logps[None], mask[None])[0][0])
    return torch.stack(sums)


def trl_kto_loss(world, examples, settings: PreferenceSettings) -> float:
    """TRL's KTOTrainer loss on our exports with the same ids (its KL rows rotated as our micro-batch rotates)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    root, _ = world
    completions = [e.completion.tolist() for e in examples]
    records = [{"prompt_ids": e.prompt.tolist(), "completion_ids": completions[i],
                "KL_completion_ids": completions[i - 1], "label": e.desirable} for i, e in enumerate(examples)]
    model = AutoModelForCausalLM.from_pretrained(root / "policy-hf", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(root / "reference-hf", dtype=torch.float32)
    args = KTOConfig(output_dir=str(root / "trl-kto"), beta=settings.beta, desirable_weight=settings.desirable_weight,
                     undesirable_weight=settings.undesirable_weight, report_to=[], use_cpu=True,
                     per_device_train_batch_size=len(records), max_length=None, bf16=False, fp16=False)
    placeholder = Dataset.from_list([{"prompt": PROMPT, "completion": ANSWER, "label": True},
                                     {"prompt": PROMPT, "completion": "No.", "label": False}])  # TRL tokenises text
    trainer = KTOTrainer(model=model, ref_model=reference, args=args, train_dataset=placeholder,
                         processing_class=AutoTokenizer.from_pretrained(root / "policy-hf"))  # ours: the ids below
    batch = trainer.data_collator(records)
    model.eval()
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, batch, return_outputs=False))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.75)])
def test_the_loss_equals_trls_kto_trainer_on_our_export(world, tmp_path, weights):
    root, tok = world
    records = [{"prompt": "It was the age of", "completion": " wisdom.", "label": True},
               {"prompt": "It was the age of", "completion": " foolishness, it was the epoch", "label": False},
               {"prompt": PROMPT, "completion": ANSWER, "label": True},
               {"prompt": "Name the season of Darkness.", "completion": "It was the winter of despair.",
                "label": False}]
    examples = tokenize_feedback(load_feedback(write(tmp_path / "f.json", records))[0], tok, "alpaca", 64, "f")
    main = [(e.prompt.tolist(), e.completion.tolist()) for e in examples]
    mismatched = [(e.prompt.tolist(), examples[i - 1].completion.tolist()) for i, e in enumerate(examples)]
    ours = {}
    for name in ("policy", "reference"):
        lm = LanguageModel.from_checkpoint(str(root / name), device="cpu")
        ours[name] = (completion_logps(lm, main), completion_logps(lm, mismatched))
    kl = kl_estimate(ours["policy"][1], ours["reference"][1])
    assert kl > 0.05, kl  # the reference point is not clamped away: the test covers it
    settings = PreferenceSettings("kto", 0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
    desirable = torch.tensor([e.desirable for e in examples])
    outcome = feedback_losses(ours["policy"][0], ours["reference"][0], desirable, kl, settings)
    theirs = trl_kto_loss(world, examples, settings)
    assert abs(outcome.losses.mean().item() - theirs) <= 1e-5, (outcome.losses.mean().item(), theirs)


# --------------------------------------------------------------------------- training through deepy.py
def feedback_records(n: int = 24) -> list[dict]:
    """Completions that repeat the prompt's words (desirable) or reverse them (undesirable)."""
    from test_preference import preference_records

    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(preference_records(n))]


def kto_full_args(save, data, *layout: str) -> list[str]:
    """Full-model KTO (a frozen reference copy) on ``data`` over the shared base."""
    from helpers.finetune import deepy_args, shared_setup

    _, _, tokenizer, base = shared_setup()
    full = [a for a in KTO if not a.startswith(("lora", "val_split"))] + ["optimizer.params.lr=1e-3",
                                                                         "eval_interval=4", "checkpoint_factor=4"]
    return deepy_args(save, tokenizer, *full, f"load={base}", f"preference_data_path={data}", "data_path=null",
                      *layout)


def _tp2_case(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return kto_full_args(folder / "run", write(folder / "feedback.json", feedback_records(16)), "num_gpus=2",
                         "model_parallel_size=2")


def _zero3_case(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return kto_full_args(folder / "run", write(folder / "feedback.json", feedback_records(16)), "num_gpus=2",
                         "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0")


register(Case("kto-full-tp2", 2, "train", _tp2_case))  # cases of the shared 2-rank launch
register(Case("kto-full-zero3-dp2", 2, "train", _zero3_case))


KTO = ["finetune=true", "lora_r=8", "lora_alpha=16", "lora_dropout=0", "lora_targets=[query,value,mlp]",
       "preference_loss=kto", "prompt_style=alpaca", "optimizer.params.lr=1e-2", "train_iters=4", "eval_interval=2",
       "checkpoint_factor=4", "val_split_fraction=0.25", "kto_undesirable_weight=1.25"]


def test_a_lora_kto_run_starts_at_policy_equals_reference_and_logs_trls_kto_metrics(finetune_setup, tmp_path):
    from helpers.finetune import deepy, metrics
    from helpers.runner import ok

    from neox_llama.checkpoint.metadata import read_metadata

    _, _, tokenizer, base = finetune_setup
    data = write(tmp_path / "feedback.json", feedback_records())
    save = tmp_path / "kto"
    proc = ok(deepy(save, tokenizer, *KTO, f"load={base}", f"preference_data_path={data}", "data_path=null"))
    assert "feedback data" in proc.stderr and "18 training records" in proc.stderr
    steps = metrics(save)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    first = steps[0]  # policy = reference (B is zero): every ratio and the reference point are 0, each loss w / 2
    assert first["kl"] == 0.0 and first["rewards/chosen"] == 0.0 == first["rewards/rejected"]
    assert min(abs(first["loss"] - v) for v in (0.5, 0.5625, 0.625)) <= 1e-7  # 2 completions, w 1 or 1.25 each
    logged = set().union(*map(set, steps))  # a step whose completions share one label logs that label's metrics
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"} <= logged
    assert any(r["kl"] > 0 for r in steps[1:])  # the policy has moved: the reference point is estimated
    valid = metrics(save, "valid_loss")
    assert [r["step"] for r in valid] == [2, 4]
    assert {"valid_rewards/chosen", "valid_rewards/rejected", "valid_rewards/margins", "valid_kl"} <= set(valid[-1])
    assert valid[-1]["valid_rewards/margins"] > valid[0]["valid_rewards/margins"]  # held-out completions told apart
    from helpers import inprocess
    from helpers.runner import ROOT

    out = tmp_path / "kto.json"
    proc = inprocess.tool("evaluate.py", "--checkpoint", str(save / "global_step4"), "--preference-data", str(data),
                          "--output", str(out), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["completions"] == 24 and result["loss_type"] == "kto" and result["kl"] >= 0
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(
        result)
    from neox_llama.evaluation.preference import evaluate_feedback
    from neox_llama.generation.language_model import LanguageModel

    lm = LanguageModel.from_checkpoint(str(finetune_setup[3]), device="cpu")  # the base against itself
    same = evaluate_feedback(lm, lm, data, PreferenceSettings("kto", 0.1, undesirable_weight=1.25), "alpaca").values
    assert same["kl"] == 0.0 and same["rewards/margins"] == 0.0
    assert same["loss"] == pytest.approx((12 * 0.5 + 12 * 0.625) / 24, abs=1e-12)  # each completion w / 2
    meta = read_metadata(save / "global_step4")
    assert meta.preference == {"loss": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.25,
                               "reference": "base_without_adapters"}


@pytest.mark.uses_cases("kto-full-tp2", "kto-full-zero3-dp2")
def test_full_model_kto_with_its_reference_sliced_by_tp2_follows_one_rank(launched, tmp_path):
    """The frozen reference copy sliced like the policy (tp2: the same micro-batches as one rank, so the same
    reference points) gives the one-rank losses and KTO metrics. Partitioned under ZeRO-3 on 2 data-parallel ranks
    the reference equals the policy at step 1 (every ratio and the reference point 0); later steps differ from one
    rank by KTO's definition (each micro-batch's reference point is averaged over the ranks' micro-batches)."""
    from helpers.finetune import metrics
    from helpers.runner import ok
    from helpers.training import start_deepy

    one = tmp_path / "one"
    proc = ok(start_deepy(kto_full_args(one, write(tmp_path / "feedback.json", feedback_records(16)))))
    assert "preference reference: a frozen copy" in proc.stderr
    ones, tp2 = metrics(one), metrics(launched("kto-full-tp2").check().folder / "run")
    assert ones[0]["kl"] == 0.0 and any(r["kl"] > 0 for r in ones)
    for key in ("loss", "kl"):
        a, b = [r[key] for r in ones], [r[key] for r in tp2]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5, (key, a, b)
    zero3 = metrics(launched("kto-full-zero3-dp2").check().folder / "run")
    assert [r["step"] for r in zero3] == [1, 2, 3, 4]
    assert zero3[0]["kl"] == 0.0 and zero3[0].get("rewards/chosen", 0.0) == 0.0 == zero3[0].get("rewards/rejected", 0.0)
    assert any(r["kl"] > 0 for r in zero3[1:])  # the policy moved away from the partitioned reference


BAD_CONFIGS = [
    (["train_micro_batch_size_per_gpu=1"], "preference_loss kto with train_micro_batch_size_per_gpu 1"),
    (["rpo_alpha=0.5"], "rpo_alpha (an SFT term on the chosen answers of pairs) applies to preference_loss dpo or"),
    (["preference_loss=dpo", "kto_desirable_weight=2"], "kto_desirable_weight applies to preference_loss kto, not"),
    (["preference_reference=precomputed"], "preference_reference precomputed with preference_loss kto: KTO's "),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_a_kto_config_outside_its_rules_is_one_line(overrides, message):
    from helpers.runner import ROOT

    from neox_llama.config import ConfigError, load_config

    keys = ["tokenizer_type=null", "vocab_file=tok.model", "vocab_size=320", "data_path=null", "load=ck",
            "preference_loss=kto", "preference_data_path=f.json", "lora_r=8", "train_micro_batch_size_per_gpu=2"]
    with pytest.raises(ConfigError) as err:
        load_config([ROOT / "configs/llama3/tiny.yml"], [*keys, *overrides])
    assert message in str(err.value), str(err.value)


def test_a_feedback_file_given_to_dpo_and_pairs_given_to_kto_are_one_line(tmp_path):
    from neox_llama.data.preference import load_pairs

    feedback = write(tmp_path / "f.json", feedback_records(2))
    with pytest.raises(PreferenceDataError) as err:
        load_pairs(feedback)
    assert "field 'chosen' is missing" in str(err.value)
    pairs = write(tmp_path / "p.json", [{"prompt": PROMPT, "chosen": ANSWER, "rejected": "No."}])
    with pytest.raises(PreferenceDataError) as err:
        load_feedback(pairs)
    assert "field 'label' is missing" in str(err.value)
