"""Reward models (``preference_loss: rm``): a scalar score head on the last token trained with the Bradley-Terry
loss (with margins), full or LoRA; the training path's scores equal tools/evaluate.py's and transformers' on the
LlamaForSequenceClassification export (fp32), the loss TRL's RewardTrainer's; the export comes back in through
convert_from_hf.py with equal scores, and a LoRA reward model merges and exports to PEFT (modules_to_save score)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_preference import preference_records, write

RM = ["finetune=true", "preference_loss=rm", "prompt_style=alpaca", "optimizer.params.lr=1e-3", "train_iters=4",
      "eval_interval=4", "checkpoint_factor=4", "rm_margin_key=margin", "seq_length=128", "data_path=null"]


def rm_records(n: int, start: int = 0) -> list[dict]:
    records = preference_records(start + n)[start:]
    return [{**r, "margin": 0.5 if i % 3 == 0 else 0.0} for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def reward_runs(finetune_setup, tmp_path_factory):
    """A full and a LoRA reward model over the shared base; validation on 2 pairs (one evaluation batch)."""
    from helpers.finetune import deepy
    from helpers.runner import ok

    _, _, tokenizer, base = finetune_setup
    root = tmp_path_factory.mktemp("rm")
    train, valid = write(root / "train.json", rm_records(12)), write(root / "valid.json", rm_records(2, 12))
    data = [f"load={base}", f"preference_data_path={train}", f"preference_valid_data_path={valid}"]
    lora = ["lora_r=8", "lora_alpha=16", "lora_targets=[query,value]", "optimizer.params.lr=1e-2"]
    procs = {"full": ok(deepy(root / "full", tokenizer, *RM, *data)),
             "lora": ok(deepy(root / "lora", tokenizer, *RM, *data, *lora))}
    tied = tied_base(root / "tied-base", tokenizer)  # a base whose head is its embedding (no head file)
    procs["tied"] = ok(deepy(root / "tied", tokenizer, *RM, *data, *lora, f"load={tied}", "no_weight_tying=false"))
    return root, procs


def tied_base(folder: Path, tokenizer: Path) -> Path:
    from helpers.checkpoints import save_random_checkpoint
    from helpers.finetune import PRESET
    from helpers.runner import ROOT

    from neox_llama.config.loading import load_raw

    raw, _ = load_raw([ROOT / PRESET], apply_presets=False)
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
            "rotary_emb_base", "make_vocab_size_divisible_by")
    settings = {k: raw[k] for k in keys} | {"seq_length": 128, "precision": "fp32", "no_weight_tying": False}
    save_random_checkpoint(folder, settings, tokenizer_type="SPMTokenizer", tokenizer_file=tokenizer, seed=7)
    return folder


def test_a_reward_run_logs_its_metrics_and_saves_a_score_head(reward_runs):
    from helpers.finetune import metrics

    from neox_llama.checkpoint.metadata import read_metadata
    from neox_llama.checkpoint.weights import read_layer_file

    root, procs = reward_runs
    assert "trainable parameters on this rank: 3,648 of" in procs["lora"].stderr  # LoRA + the 64-wide score head
    for name in ("full", "lora"):
        steps = metrics(root / name)
        assert [r["step"] for r in steps] == [1, 2, 3, 4]
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(steps[0])
        (valid,) = metrics(root / name, "valid_loss")
        assert {"valid_rewards/accuracies", "valid_rewards/margins"} <= set(valid)
        assert read_metadata(root / name / "global_step4").preference == {"loss": "rm", "margin_key": "margin"}
    head = read_layer_file(root / "full" / "global_step4" / "weights" / "layer_004.safetensors")
    assert list(head) == ["score.weight"] and head["score.weight"].shape == (1, 64)


def test_training_evaluate_py_and_transformers_score_alike_and_the_loss_is_trls(reward_runs, tmp_path):
    """The last validation (the step-4 weights on valid.json) equals tools/evaluate.py on the checkpoint; the
    export loads as transformers' LlamaForSequenceClassification with equal scores (<= 1e-5) and TRL's
    RewardTrainer loss (with margins) equal to ours."""
    from helpers import inprocess
    from helpers.finetune import metrics
    from helpers.runner import ROOT
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from neox_llama.data.preference import load_pairs, tokenize_pairs
    from neox_llama.generation.language_model import LanguageModel
    from neox_llama.model.preference_loss import reward_losses

    root, _ = reward_runs
    checkpoint = root / "full" / "global_step4"
    out = tmp_path / "eval.json"
    proc = inprocess.tool("evaluate.py", "--checkpoint", str(checkpoint), "--preference-data",
                          str(root / "valid.json"), "--output", str(out), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(out.read_text())
    (valid,) = metrics(root / "full", "valid_loss")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert evaluated[key] == pytest.approx(valid["valid_loss" if key == "loss" else f"valid_{key}"], abs=1e-5)

    hf_dir = tmp_path / "hf"
    assert inprocess.tool("convert_to_hf.py", "--checkpoint", str(checkpoint), "--output", str(hf_dir), "--dtype",
                          "fp32", cwd=ROOT).returncode == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.pad_token_id == config["pad_token_id"] not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    lm = LanguageModel.from_checkpoint(str(checkpoint), device="cpu")
    pairs, _ = load_pairs(root / "valid.json", margin_key="margin")
    examples = tokenize_pairs(pairs, lm.tokenizer, "alpaca", 127, "valid")
    rows = [e.prompt.tolist() + getattr(e, side).tolist() for side in ("chosen", "rejected") for e in examples]
    batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt")  # right padding with the export's pad
    with torch.no_grad():
        theirs = hf(**batch).logits[:, 0]
        ours = torch.stack([lm.model(torch.tensor([r]))[0, -1, 0] for r in rows])
    assert (theirs - ours).abs().max() <= 1e-5, (theirs, ours)
    margins = torch.tensor([float(e.margin[0]) for e in examples])
    loss = reward_losses(*ours.chunk(2), margins).losses.mean()
    assert float(loss) == pytest.approx(evaluated["loss"], abs=1e-5)
    assert abs(float(loss) - trl_reward_loss(hf, tokenizer, batch, margins, tmp_path)) <= 1e-5


def trl_reward_loss(model, tokenizer, batch, margins, folder: Path) -> float:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(folder / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
                        per_device_train_batch_size=2)
    placeholder = Dataset.from_list([{"chosen": "a b", "rejected": "b a"}])  # TRL tokenises text; ours: ids
    trainer = RewardTrainer(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)
    model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(model, {**batch, "margin": margins}))


def test_an_exported_reward_model_comes_back_with_equal_scores(reward_runs, finetune_setup, tmp_path):
    from helpers import inprocess
    from helpers.runner import ROOT

    from neox_llama.generation.language_model import LanguageModel

    root, _ = reward_runs
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert inprocess.tool("convert_to_hf.py", "--checkpoint", str(root / "full" / "global_step4"), "--output",
                          str(hf_dir), "--dtype", "fp32", cwd=ROOT).returncode == 0
    proc = inprocess.tool("convert_from_hf.py", "--hf", str(hf_dir), "--output", str(back), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        a = LanguageModel.from_checkpoint(str(root / "full" / "global_step4"), device="cpu").model(ids)
        b = LanguageModel.from_checkpoint(str(back), device="cpu").model(ids)
    assert a.shape == (1, 6, 1) and torch.equal(a, b)
    for checkpoint in (root / "full" / "global_step4", back):  # the same accuracy, cut at the same length
        out = tmp_path / f"{checkpoint.name}.json"
        assert inprocess.tool("evaluate.py", "--checkpoint", str(checkpoint), "--preference-data",
                              str(root / "train.json"), "--seq-length", "128", "--output", str(out),
                              cwd=ROOT).returncode == 0
    first, second = (json.loads((tmp_path / f"{c}.json").read_text()) for c in ("global_step4", "back"))
    assert first["rewards/chosen"] == pytest.approx(second["rewards/chosen"], abs=1e-6)
    assert first["rewards/accuracies"] == second["rewards/accuracies"]
    from helpers.finetune import deepy
    from helpers.runner import ok

    from neox_llama.checkpoint.weights import read_layer_file

    ok(deepy(tmp_path / "more", finetune_setup[2], *RM, f"load={back}", "optimizer.params.lr=0", "min_lr=0",
             "train_iters=1", "checkpoint_factor=1", f"preference_data_path={root / 'train.json'}",
             "val_split_fraction=0"))  # the import keeps training as a reward model, its head read
    head = "weights/layer_004.safetensors"
    assert torch.equal(read_layer_file(tmp_path / "more" / "global_step1" / head)["score.weight"],
                       read_layer_file(back / "global_step0" / head)["score.weight"])


def test_a_lora_reward_model_over_a_tied_base_exports_with_its_score_head(reward_runs, tmp_path):
    from helpers import inprocess
    from helpers.runner import ROOT
    from transformers import AutoModelForSequenceClassification

    from neox_llama.generation.language_model import LanguageModel

    root, _ = reward_runs
    adapter, hf_dir = root / "tied" / "global_step4", tmp_path / "hf"
    proc = inprocess.tool("convert_to_hf.py", "--checkpoint", str(adapter), "--output", str(hf_dir), "--dtype", "fp32",
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        ours = LanguageModel.from_checkpoint(str(adapter), device="cpu").model(ids)[0, -1, 0]
        theirs = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32)(ids).logits[0, 0]
    assert abs(float(ours - theirs)) <= 1e-5


def test_a_reward_model_trained_further_keeps_its_score_head(reward_runs, finetune_setup, tmp_path):
    """A reward model as the start of another reward run: its score head is read, never started fresh (a missing
    head file is an error naming it)."""
    from helpers.finetune import deepy
    from helpers.runner import ok

    from neox_llama.checkpoint.weights import read_layer_file

    root, _ = reward_runs
    source = root / "full" / "global_step4"
    ok(deepy(tmp_path / "again", finetune_setup[2], *RM, f"load={source}", "optimizer.params.lr=0", "min_lr=0", "train_iters=1",
             "checkpoint_factor=1", f"preference_data_path={root / 'train.json'}", "val_split_fraction=0"))
    head = "weights/layer_004.safetensors"
    assert torch.equal(read_layer_file(tmp_path / "again" / "global_step1" / head)["score.weight"],
                       read_layer_file(source / head)["score.weight"])
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    (damaged / head).unlink()  # a reward model without its head file: an error, never a fresh head
    proc = deepy(tmp_path / "from-damaged", finetune_setup[2], *RM, f"load={damaged}", "train_iters=1",
                 f"preference_data_path={root / 'train.json'}", "val_split_fraction=0")
    assert proc.returncode != 0 and "layer_004.safetensors: missing" in proc.stderr, proc.stderr[-2000:]


def test_margins_are_cached_per_margin_key(finetune_setup, tmp_path):
    from neox_llama.data.preference import cached_pairs, load_pairs
    from neox_llama.tokenizers import build_tokenizer

    tok = build_tokenizer("SPMTokenizer", finetune_setup[2])
    path = write(tmp_path / "p.json", [{**r, "m2": 2.0} for r in rm_records(3)])
    margins = {}
    for key in ("margin", "m2"):
        pairs, _ = load_pairs(path, margin_key=key)
        examples = cached_pairs(path, pairs, "all", tok, "alpaca", 127, 1, 0.0, margin_key=key)
        margins[key] = [float(e.margin[0]) for e in examples]
    assert margins == {"margin": [0.5, 0.0, 0.0], "m2": [2.0, 2.0, 2.0]}


def test_a_lora_reward_model_merges_and_exports_to_peft_with_equal_scores(reward_runs, tmp_path):
    from helpers import inprocess
    from helpers.runner import ROOT
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from neox_llama.generation.language_model import LanguageModel

    root, _ = reward_runs
    adapter = root / "lora" / "global_step4"
    merged, peft_dir, base_hf = tmp_path / "merged", tmp_path / "peft", tmp_path / "base-hf"
    assert inprocess.tool("merge_lora.py", "--checkpoint", str(adapter), "--output", str(merged),
                          cwd=ROOT).returncode == 0
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        ours = LanguageModel.from_checkpoint(str(adapter), device="cpu").model(ids)[0, -1, 0]
        from_merged = LanguageModel.from_checkpoint(str(merged), device="cpu").model(ids)[0, -1, 0]
    assert abs(float(ours - from_merged)) <= 1e-6
    base = json.loads((adapter / "metadata.json").read_text())["base"]["path"]
    for args in (["--checkpoint", str(adapter), "--output", str(peft_dir), "--peft"],
                 ["--checkpoint", base, "--output", str(base_hf), "--dtype", "fp32"]):
        proc = inprocess.tool("convert_to_hf.py", *args, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    hf = AutoModelForSequenceClassification.from_pretrained(base_hf, num_labels=1, pad_token_id=0,
                                                            dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, peft_dir).eval()(ids).logits[0, 0]
    assert abs(float(theirs - ours)) <= 1e-5


BAD_CONFIGS = [
    (["rm_margin_key=margin", "preference_loss=dpo"], "rm_margin_key applies to preference_loss rm"),
    (["preference_reference=precomputed"], "preference_reference precomputed with preference_loss rm"),
    (["peft_method=adapter"], "preference_loss rm with peft_method adapter: a reward model trains its score head"),
    (["rpo_alpha=0.5"], "rpo_alpha (an SFT term on the chosen answers of pairs) applies to preference_loss dpo or"),
    (["preference_loss=null", "preference_data_path=null", "reward_head=true", "sft_data_path=r.json"],
     "reward_head with sft_data_path: a reward model scores sequences"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_a_reward_config_outside_its_rules_is_one_line(overrides, message):
    from helpers.runner import ROOT

    from neox_llama.config import ConfigError, load_config

    keys = ["tokenizer_type=null", "vocab_file=tok.model", "vocab_size=320", "data_path=null", "load=ck",
            "preference_loss=rm", "preference_data_path=p.json"]
    with pytest.raises(ConfigError) as err:
        load_config([ROOT / "configs/llama3/tiny.yml"], [*keys, *overrides])
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(("margin", "found"), [(None, "missing"), ("big", "'big'"), (True, "True")])
def test_a_bad_margin_is_one_line_naming_the_record(tmp_path, margin, found):
    from neox_llama.data.preference import PreferenceDataError, load_pairs

    record = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if margin is not None:
        record["margin"] = margin
    path = write(tmp_path / "p.json", [record])
    with pytest.raises(PreferenceDataError) as err:
        load_pairs(path, margin_key="margin")
    assert f"{path}: record 0: margin (rm_margin_key) is {found}; it must be a finite number" in str(err.value)


@pytest.mark.parametrize(("tool", "args", "what"), [
    ("generate.py", ["--prompt", "hi"], "it cannot generate text"),
    ("serve.py", ["--port", "8999"], "it cannot serve completions"),
    ("evaluate.py", ["--text", "README.md"], "it cannot score text or run lm-eval tasks"),
    ("evaluate.py", ["--preference-data", "README.md", "--reference", "x"], "--reference: "),
])
def test_a_reward_model_given_to_a_language_model_tool_is_one_line(reward_runs, tool, args, what):
    from helpers import inprocess
    from helpers.runner import ROOT

    root, _ = reward_runs
    proc = inprocess.tool(tool, "--checkpoint", str(root / "full" / "global_step4"), *args, cwd=ROOT)
    said = "is a reward model, which scores pairs without a reference model; drop --reference" if what == "--reference: " \
        else f"is a reward model (a score head, no vocabulary head): {what}"
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
