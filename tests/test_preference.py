"""Preference data and losses (DPO, IPO, conservative DPO, RPO's SFT term): every record format to the same ids, one
truncation rule for both sides of a pair, one-line errors per bad record; and the losses equal TRL's DPOTrainer on
our Hugging Face export with identical token ids (fp32), conservative DPO the paper's formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import save_random_checkpoint
from helpers.evaluation import SETTINGS, TEXT
from helpers.launches import Case, register

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


# --------------------------------------------------------------------------- training through deepy.py
def preference_records(n: int = 24) -> list[dict]:
    """Pairs whose chosen answer repeats the prompt's words and whose rejected one reverses them."""
    from helpers.finetune import WORDS

    out = []
    for i in range(n):
        words = [WORDS[(i * 5 + k * 2) % len(WORDS)] for k in range(3)]
        out.append({"prompt": f"Repeat the words: {' '.join(words)}", "chosen": " ".join(words),
                    "rejected": " ".join(reversed(words))})
    return out


DPO = ["finetune=true", "lora_r=8", "lora_alpha=16", "lora_dropout=0", "lora_targets=[query,value,mlp]",
       "preference_loss=dpo", "prompt_style=alpaca", "optimizer.params.lr=1e-2", "train_iters=4", "eval_interval=2",
       "checkpoint_factor=2", "val_split_fraction=0.2"]


def pairs_file() -> Path:
    """The session's preference pairs, written once beside the shared fine-tuning base."""
    from helpers.finetune import shared_setup

    folder = shared_setup()[0]
    path = folder / "pairs.json"
    if not path.exists():
        write(path, preference_records())
    return path


def dpo_args(save: Path, *layout: str) -> list[str]:
    from helpers.finetune import deepy_args, shared_setup

    _, _, tokenizer, base = shared_setup()
    return deepy_args(save, tokenizer, *DPO, f"load={base}", f"preference_data_path={pairs_file()}", "data_path=null",
                      *layout)


DP2_STAGES = (0, 1, 2)
for _stage in DP2_STAGES:  # cases of the shared 2-rank launch
    register(Case(f"preference-lora-dp2-zero{_stage}", 2, "train", lambda folder, stage=_stage: dpo_args(
        folder / "run", "num_gpus=2", "train_micro_batch_size_per_gpu=1", f"zero_optimization.stage={stage}")))

FULL = ["lora_r=0", "optimizer.params.lr=1e-3", "train_iters=3", "eval_interval=3", "checkpoint_factor=3"]
"""Full-model DPO (a frozen reference copy) over dpo_args' LoRA settings."""
FULL_LAYOUTS = {"tp2": ["model_parallel_size=2"],
                "zero3-dp2": ["zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0",
                              "train_micro_batch_size_per_gpu=1"]}
for _name, _layout in FULL_LAYOUTS.items():  # cases of the shared 2-rank launch
    register(Case(f"preference-full-{_name}", 2, "train", lambda folder, layout=tuple(_layout): dpo_args(
        folder / "run", *FULL, "num_gpus=2", *layout)))


def own_pairs(folder: Path) -> str:
    """A copy of the session's pairs in ``folder``: its precomputed reference file is this run's own."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    return f"preference_data_path={shutil.copy(pairs_file(), folder / 'pairs.json')}"


register(Case("preference-full-zero3-dp2-precomputed", 2, "train", lambda folder: dpo_args(
    folder / "run", *FULL, "num_gpus=2", *FULL_LAYOUTS["zero3-dp2"], "preference_reference=precomputed",
    own_pairs(folder))))


@pytest.fixture(scope="module")
def dpo_run(finetune_setup, tmp_path_factory):
    from helpers.runner import ok
    from helpers.training import start_deepy

    save = tmp_path_factory.mktemp("dpo") / "run"
    return save, ok(start_deepy(dpo_args(save)))


def test_a_lora_dpo_run_starts_at_ln_2_logs_trls_metrics_and_saves_a_self_describing_adapter(finetune_setup,
                                                                                             dpo_run):
    from helpers.finetune import metrics

    from neox_llama.checkpoint.metadata import read_metadata

    base = finetune_setup[3]
    save, proc = dpo_run
    assert "preference data" in proc.stderr and "19 training and 5 validation pairs" in proc.stderr
    steps = metrics(save)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference (B is zero)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(steps[-1])
    valid = metrics(save, "valid_loss")  # the held-out pairs: preferred more after training
    assert [r["step"] for r in valid] == [2, 4] and valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    assert valid[-1]["valid_rewards/accuracies"] > 0.5 and valid[-1]["valid_rewards/margins"] > 0
    assert "valid_ppl" not in valid[-1]  # a preference loss has no perplexity
    meta = read_metadata(save / "global_step4")
    assert meta.preference == {"loss": "dpo", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": 0.0,
                               "reference": "base_without_adapters"}
    assert meta.lora is not None and meta.base.path == str(base.resolve())


PREFERENCE_KEYS = ["tokenizer_type=null", "vocab_file=tok.model", "vocab_size=320", "data_path=null",
                   "load=ck", "preference_loss=dpo", "preference_data_path=pairs.json", "lora_r=8"]
BAD_CONFIGS = [
    (["preference_data_path=null"], "preference_loss and preference_data_path go together"),
    (["pipe_parallel_size=2", "num_gpus=2"], "preference_loss with pipe_parallel_size 2: a pair's two responses"),
    (["lora_r=0", "peft_method=adapter_v2"], "peft_method adapter_v2: it trains the base's norms"),
    (["dpo_beta=0"], "dpo_beta must be above 0, got 0"),
    (["dpo_label_smoothing=0.5"], "dpo_label_smoothing must be below 0.5"),
    (["preference_loss=ipo", "dpo_label_smoothing=0.1"], "applies to preference_loss dpo, not ipo"),
    (["data_path=corpus"], "preference_data_path (pairs) and data_path (set by command line) are both set"),
    (["load=null"], "preference tuning starts from a trained model, which is also its reference: set load"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_a_preference_config_outside_its_rules_is_one_line(overrides, message):
    from helpers.runner import ROOT

    from neox_llama.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([ROOT / "configs/llama3/tiny.yml"], [*PREFERENCE_KEYS, *overrides])
    assert message in str(err.value), str(err.value)


def test_an_instruction_lora_checkpoint_is_refused_as_a_preference_runs_load(finetune_setup, tmp_path):
    from helpers.finetune import deepy
    from helpers.lora import SETTINGS as LORA_SETTINGS
    from helpers.lora import adapter_checkpoint

    _, _, tokenizer, base = finetune_setup
    sft = adapter_checkpoint(tmp_path / "sft", base, LORA_SETTINGS, seed=2)
    pairs = write(tmp_path / "pairs.json", preference_records(4))
    proc = deepy(tmp_path / "run", tokenizer, "lora_r=3", "lora_alpha=7", "lora_targets=[key,output,mlp,head]",
                 "preference_loss=dpo", f"preference_data_path={pairs}", "data_path=null", f"load={sft}",
                 "finetune=false")
    assert proc.returncode != 0 and "is a LoRA checkpoint of instruction tuning" in proc.stderr
    assert "Traceback" not in proc.stderr


def hf_response_logps(model_dir: Path, tokenizer_dir: Path, prompt: str, response: str) -> float:
    """A response's summed log-probability as ``transformers`` computes it on an export, the prompt and response
    rendered by the exported chat template (``apply_chat_template``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    user = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=True,
                                        return_dict=False)
    assert ids[: len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].double().sum())


def test_a_full_dpo_run_has_a_frozen_copy_as_reference_and_its_logps_are_transformers(finetune_setup, tmp_path,
                                                                                     monkeypatch):
    """Full fine-tuning: the reference is a frozen copy of the start (policy = reference at step 1: the IPO value),
    the policy moves away from it, and the checkpoint says which reference it was trained against. Step 1 holds
    both training pairs, so its logged logps/* are those of the starting weights: equal to what transformers
    computes on the base's export with the run's exported chat template. TensorBoard and W&B get TRL's names."""
    from helpers.finetune import deepy, metrics
    from helpers.runner import ok
    from helpers.wandb_log import history
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from neox_llama.checkpoint.metadata import read_metadata
    from neox_llama.convert.hf_export import export_to_hf

    monkeypatch.setenv("WANDB_MODE", "offline")
    _, _, tokenizer, base = finetune_setup
    train = preference_records(6)[:2]  # one step's pairs (2 per micro-batch, 1 rank)
    pairs, valid = write(tmp_path / "pairs.json", train), write(tmp_path / "valid.json", preference_records(6)[2:])
    save = tmp_path / "full"
    full = [a for a in DPO if not a.startswith(("lora", "val_split"))] + [
        "optimizer.params.lr=1e-3", "preference_loss=ipo", "dpo_beta=0.5", f"preference_valid_data_path={valid}",
        "seq_length=128",  # the Alpaca prompts whole (at 64 they are cut from the left; transformers renders them whole)
        f"tensorboard_dir={tmp_path / 'tb'}", "use_wandb=true", "wandb_project=neox-llama-test"]
    ok(deepy(save, tokenizer, *full, f"load={base}", f"preference_data_path={pairs}", "data_path=null"))
    steps = metrics(save)
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-6)  # IPO at policy = reference: (0 - 1 / (2 x 0.5))^2
    assert steps[1]["rewards/chosen"] != 0.0
    meta = read_metadata(save / "global_step4")
    assert meta.preference["reference"] == "frozen_copy" and meta.preference["loss"] == "ipo" and meta.lora is None

    export_to_hf(base, tmp_path / "base-hf", dtype="fp32")  # the starting weights
    export_to_hf(save / "global_step4", tmp_path / "run-hf", dtype="fp32")  # its tokenizer carries the template
    assert (tmp_path / "run-hf" / "chat_template.jinja").is_file()
    for side in ("chosen", "rejected"):
        theirs = [hf_response_logps(tmp_path / "base-hf", tmp_path / "run-hf", r["prompt"], r[side]) for r in train]
        assert steps[0][f"logps/{side}"] == pytest.approx(sum(theirs) / len(theirs), abs=1e-4), side

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (run_file,) = (save / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    wandb_rows = {r["_step"]: r for r in history(run_file)}
    for key in ("loss", *(f"{p}{m}" for p in ("", "valid_") for m in ("rewards/chosen", "rewards/rejected",
                                                                       "rewards/accuracies", "rewards/margins",
                                                                       "logps/chosen", "logps/rejected"))):
        logged = {r["step"]: r[key] for r in metrics(save, key)}
        assert logged, key
        tb = {e.step: e.value for e in events.Scalars(key)}
        assert tb.keys() == logged.keys() and all(abs(tb[s] - v) <= 1e-5 * max(1.0, abs(v)) for s, v in
                                                  logged.items()), key  # TensorBoard stores float32
        assert {s: wandb_rows[s][key] for s in logged} == logged, key


@pytest.mark.uses_cases(*(f"preference-lora-dp2-zero{stage}" for stage in DP2_STAGES))
def test_dp2_at_zero_0_1_2_and_activation_checkpointing_follow_one_rank_and_a_resume_is_exact(launched, dpo_run,
                                                                                             tmp_path):
    """The LoRA DPO run on two data-parallel ranks (ZeRO 0, 1, 2) and with activation checkpointing gives the
    one-rank losses; resumed from its step-2 checkpoint, the one-rank run continues exactly."""
    import shutil

    from helpers.finetune import metrics
    from helpers.runner import ok
    from helpers.training import start_deepy

    save, _ = dpo_run
    ones = [r["loss"] for r in metrics(save)]
    checkpointed = tmp_path / "checkpointed"
    ok(start_deepy(dpo_args(checkpointed, "checkpoint_activations=true")))
    runs = {f"dp2 ZeRO {s}": launched(f"preference-lora-dp2-zero{s}").check().folder / "run" for s in DP2_STAGES}
    for name, run in {**runs, "checkpointed": checkpointed}.items():
        others = [r["loss"] for r in metrics(run)]
        assert max(abs(a - b) for a, b in zip(ones, others, strict=True)) <= 1e-5, (name, ones, others)
    resumed = tmp_path / "resumed"
    shutil.copytree(save / "global_step2", resumed / "global_step2")
    (resumed / "latest").write_text("global_step2")
    ok(start_deepy(dpo_args(resumed, f"load={resumed}", "finetune=false")))
    assert [r["loss"] for r in metrics(resumed)] == ones[2:]  # exactly


@pytest.mark.uses_cases(*(f"preference-full-{name}" for name in FULL_LAYOUTS), "preference-full-zero3-dp2-precomputed")
def test_a_full_dpo_reference_sliced_by_tp2_partitioned_by_zero3_or_precomputed_follows_one_rank(launched, tmp_path):
    """Full-model DPO with its frozen reference copy sliced like the policy (tp2) or partitioned like it (ZeRO-3
    over 2 data-parallel ranks, built under zero.Init), or with the reference log-probabilities precomputed (on
    1 rank, and on 2 ZeRO-3 ranks each scoring its share), gives the one-rank losses and metrics; a precomputed run
    resumed without its reference file computes it again from the starting weights, not the moved policy."""
    import shutil

    from helpers.finetune import metrics
    from helpers.runner import ok
    from helpers.training import start_deepy

    one = tmp_path / "one"
    proc = ok(start_deepy(dpo_args(one, *FULL)))
    assert "fine-tuning from the weights of" in proc.stderr
    ones = metrics(one)
    assert ones[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and ones[-1]["loss"] != ones[0]["loss"]
    pre = tmp_path / "precomputed"
    data = own_pairs(tmp_path / "data")
    proc = ok(start_deepy(dpo_args(pre, *FULL, "preference_reference=precomputed", "checkpoint_factor=1", data)))
    assert "computed by the starting weights" in proc.stderr and "preference reference: a frozen copy" not in proc.stderr
    files = sorted((tmp_path / "data").glob(".pairs.json.*.reference.npy"))
    assert len(files) == 2  # the training and validation splits
    resumed = tmp_path / "resumed"
    shutil.copytree(pre / "global_step1", resumed / "global_step1")
    (resumed / "latest").write_text("global_step1")
    for file in files:
        file.unlink()
    proc = ok(start_deepy(dpo_args(resumed, *FULL, "preference_reference=precomputed", data, f"load={resumed}",
                                   "finetune=false")))
    assert "preference reference: a frozen copy" in proc.stderr  # the temporary copy of the starting weights
    runs = {name: launched(f"preference-full-{name}").check().folder / "run" for name in FULL_LAYOUTS}
    runs["zero3-dp2-precomputed"] = launched("preference-full-zero3-dp2-precomputed").check().folder / "run"
    runs["precomputed"] = pre
    for name, run in runs.items():
        others = metrics(run)
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            a, b = [r[key] for r in ones], [r[key] for r in others]
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5 * max(1.0, *map(abs, a)), (name, key, a, b)
    exact = [r["loss"] for r in metrics(pre)]
    assert max(abs(a - b) for a, b in zip(exact, [r["loss"] for r in ones], strict=True)) <= 1e-6
    assert [r["loss"] for r in metrics(resumed)] == exact[1:]  # reference values computed again, equal


def test_precomputed_reference_logps_give_the_model_reference_losses_and_are_read_back(dpo_run, tmp_path):
    """LoRA DPO with preference_reference precomputed (the base with its adapters off, scored once before training)
    equals the model-reference run (<= 1e-6, training and validation); the next run reads the file back."""
    from helpers.finetune import metrics
    from helpers.runner import ok
    from helpers.training import start_deepy

    save, _ = dpo_run
    data = own_pairs(tmp_path / "data")
    pre = tmp_path / "pre"
    proc = ok(start_deepy(dpo_args(pre, "preference_reference=precomputed", data)))
    assert "computed by the base with its adapters off" in proc.stderr
    for key in ("loss", "valid_loss", "valid_rewards/margins", "valid_logps/chosen"):
        want, got = [r[key] for r in metrics(save, key)], [r[key] for r in metrics(pre, key)]
        assert max(abs(a - b) for a, b in zip(want, got, strict=True)) <= 1e-6, (key, want, got)
    again = tmp_path / "again"
    proc = ok(start_deepy(dpo_args(again, "preference_reference=precomputed", data, "train_iters=1")))
    assert proc.stderr.count("read from") == 2 and "computed by" not in proc.stderr
    assert metrics(again)[0]["loss"] == metrics(pre)[0]["loss"]
    meta = json.loads((pre / "global_step4" / "metadata.json").read_text())
    assert meta["preference"]["reference_logps"] == "precomputed"


def test_a_dpo_lora_checkpoint_merges_and_generates_like_any_lora(dpo_run, tmp_path):
    from helpers import inprocess
    from helpers.runner import ROOT

    save, _ = dpo_run
    merged = tmp_path / "merged"
    proc = inprocess.tool("merge_lora.py", "--checkpoint", str(save / "global_step4"), "--output", str(merged), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    args = ("--prompt", "Repeat the words: apple river", "--max-new-tokens", "4", "--prompt-style", "alpaca")
    as_adapter = inprocess.tool("generate.py", "--checkpoint", str(save / "global_step4"), *args, cwd=ROOT)
    from_merged = inprocess.tool("generate.py", "--checkpoint", str(merged), *args, cwd=ROOT)
    assert as_adapter.returncode == 0 and as_adapter.stdout == from_merged.stdout
    for flags in ([], ["--peft"]):  # exported merged, and as a PEFT adapter
        out = tmp_path / f"hf{len(flags)}"
        proc = inprocess.tool("convert_to_hf.py", "--checkpoint", str(save / "global_step4"), "--output", str(out),
                              *flags, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf0" / "config.json").is_file() and (tmp_path / "hf1" / "adapter_config.json").is_file()


def test_evaluate_py_reports_the_preference_metrics_against_the_reference(finetune_setup, dpo_run, tmp_path):
    from helpers import inprocess
    from helpers.runner import ROOT

    save, _ = dpo_run
    base = finetune_setup[3]
    out = tmp_path / "pref.json"
    proc = inprocess.tool("evaluate.py", "--checkpoint", str(save / "global_step4"), "--preference-data",
                          str(pairs_file()), "--output", str(out), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(result) and result["pairs"] == 24
    assert result["rewards/margins"] > 0 and result["loss"] < math.log(2)  # trained on these pairs: preferred more
    assert "rewards/accuracies" in proc.stdout
    same = tmp_path / "same.json"  # the base against itself: policy = reference
    proc = inprocess.tool("evaluate.py", "--checkpoint", str(base), "--preference-data", str(pairs_file()),
                          "--reference", str(base), "--output", str(same), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    values = json.loads(same.read_text())
    assert values["loss"] == pytest.approx(math.log(2), abs=1e-6) and values["rewards/margins"] == 0.0
    bad = inprocess.tool("evaluate.py", "--checkpoint", str(base), "--preference-data", str(pairs_file()), cwd=ROOT)
    assert bad.returncode == 2 and "records no starting checkpoint to compare with; pass --reference" in bad.stderr


def test_the_dry_run_estimate_counts_the_reference_copy_and_both_answers():
    from helpers.runner import ROOT

    from neox_llama.config import load_config
    from neox_llama.planning.memory import estimate_memory

    keys = ["tokenizer_type=SPMTokenizer", "vocab_file=tok.model", "vocab_size=null", "data_path=null", "load=ck",
            "precision=fp32"]
    pairs = ["preference_loss=dpo", "preference_data_path=pairs.json"]

    def estimate(*extra: str, world_size: int = 1):
        return estimate_memory(load_config([ROOT / "configs/llama3/tiny.yml"], [*keys, *extra], tokenizer_vocab=320,
                                           world_size=world_size))

    plain, full, lora = estimate("sft_data_path=records.json"), estimate(*pairs), estimate(*pairs, "lora_r=8")
    assert full.reference == full.parameters * 4 and lora.reference == 0.0  # fp32 weights; LoRA: the base itself
    zero3 = estimate(*pairs, "zero_optimization.stage=3", world_size=4)  # partitioned like the policy's weights
    assert zero3.weights == pytest.approx(full.parameters * 4 / 4)
    assert zero3.reference == zero3.weights + full.parameters * 4  # + its engine's prefetch (here the whole model)
    tp2 = estimate(*pairs, "model_parallel_size=2", world_size=2)  # this rank's slice
    assert tp2.reference == tp2.parameters * 4 < full.reference
    assert estimate(*pairs, "preference_reference=precomputed").reference == 0.0  # no copy while training
    assert "preference reference copy" in full.text() and "preference reference copy" not in lora.text()
    assert full.activations > plain.activations  # two answers per pair
    assert full.total - plain.total >= full.reference


def test_a_dpo_lora_checkpoint_serves_with_its_merged_models_log_probabilities(finetune_setup, dpo_run, tmp_path):
    """serve.py --adapter takes the DPO checkpoint as any LoRA one: a prompt scored through it (echo, logprobs)
    equals the merged checkpoint's log-probabilities."""
    import httpx
    from helpers import inprocess
    from helpers.runner import ROOT
    from helpers.serving import running_server

    save, _ = dpo_run
    merged = tmp_path / "merged"
    assert inprocess.tool("merge_lora.py", "--checkpoint", str(save / "global_step4"), "--output", str(merged),
                          cwd=ROOT).returncode == 0
    lm = LanguageModel.from_checkpoint(str(merged), device="cpu")
    ids = lm.tokenizer.encode_document("Repeat the words: apple river stone")
    want = lm.token_logprobs([ids])[0].tolist()
    with running_server(tmp_path, base=finetune_setup[3], adapters={"dpo": save / "global_step4"}) as (url, _):
        body = {"model": "dpo", "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert max(abs(a - b) for a, b in zip(got["token_logprobs"][1:], want, strict=True)) <= 1e-5


def test_the_reference_runs_without_dropout_and_adapters_and_leaves_the_policy_training():
    """reference_mode: the LoRA reference (the policy with its adapters off) is evaluated without dropout, as TRL
    evaluates its reference; the policy's own train/eval flags come back afterwards."""
    from neox_llama.model.args import LlamaArgs
    from neox_llama.model.llama import SINGLE_DEVICE, build_model
    from neox_llama.peft.lora import LoraSettings, apply_lora
    from neox_llama.training.preference import reference_mode

    args = LlamaArgs(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=48, vocab_size=64, max_position_embeddings=64, hidden_dropout=0.5)
    torch.manual_seed(0)
    model = build_model(args)
    layers = dict(enumerate(model.children()))
    apply_lora(layers, LoraSettings(4, 8.0, 0.5, ("query", "value", "mlp")), SINGLE_DEVICE, seed=3)
    for name, param in model.named_parameters():
        if name.endswith("lora.b"):
            param.data.normal_()  # an adapter that changes the output
    frozen = next(m for m in model.modules() if type(m).__name__ == "LoRA").eval()  # a flag to keep as it was
    model.train()
    frozen.eval()
    ids = torch.randint(0, 64, (2, 16))
    with reference_mode(model, adapters_off=True):
        first, second = model(ids), model(ids)
    assert torch.equal(first, second) and not first.requires_grad  # no dropout, no graph
    from neox_llama.peft.switch import adapters_disabled

    with adapters_disabled(), torch.no_grad():
        base = model.eval()(ids)
    model.train()
    frozen.eval()
    with reference_mode(model, adapters_off=False):
        adapted = model(ids)
    assert not torch.allclose(adapted, base) and torch.equal(first, base)  # adapters off: the base alone
    assert model.training and not frozen.training  # the flags are back as they were
    assert not torch.equal(model(ids), model(ids))  # outside: the policy's dropout is on
