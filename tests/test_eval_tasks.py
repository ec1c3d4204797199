"""lm-eval tasks during training (eval_tasks): run on the training engine's model over data-parallel ranks (ZeRO-3,
so every rank must run as many forward passes as the others), logged beside valid_loss, and equal to evaluating the
checkpoint saved at the same step; layouts the facade cannot run are refused at config time."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.evaluation import TEXT
from helpers.runner import ROOT
from helpers.training import deepy_train, losses, records

from neox_llama.config import ConfigError, load_config
from neox_llama.data.indexed import IndexedDatasetWriter
from neox_llama.evaluation.harness import run_tasks
from neox_llama.generation.language_model import LanguageModel
from neox_llama.tokenizers import build_tokenizer
from neox_llama.tokenizers.train import train_sentencepiece
from neox_llama.training.eval_tasks import task_metrics

TASKS = ["eval_tasks=[neox_tiny_mc,neox_tiny_ppl]", f"eval_tasks_include_path={ROOT / 'tests' / 'data' / 'lm_eval'}"]


@pytest.mark.dist
def test_eval_tasks_during_training_equal_the_checkpoints_evaluation(tmp_path):
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    tokenizer = train_sentencepiece([tmp_path / "text.jsonl"], tmp_path / "tok", 320)
    tok = build_tokenizer("SPMTokenizer", tokenizer)
    with IndexedDatasetWriter(tmp_path / "docs", np.uint16) as writer:
        for i in range(40):
            writer.add_document(tok.encode_document(TEXT[i * 7:] + TEXT[: i * 7]))
    # Batches of one and a document longer than the context: the ranks score different numbers of windows, and
    # under ZeRO-3 must still run the same number of forward passes. Dropout on: lm-eval must not change training.
    common = ["tokenizer_type=SPMTokenizer", f"vocab_file={tokenizer}", "vocab_size=null", "num_gpus=2",
              "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0", "train_iters=4",
              "eval_interval=2", "checkpoint_factor=4", "train_micro_batch_size_per_gpu=2",
              "gradient_accumulation_steps=1", "train_batch_size=null", "hidden_dropout=0.1", "attention_dropout=0.1"]
    proc = deepy_train(tmp_path / "run", tmp_path / "docs", *common, *TASKS, "eval_tasks_batch_size=1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    logged = {r["step"]: r for r in records(tmp_path / "run", "neox_tiny_mc/acc")}
    assert sorted(logged) == [2, 4] and all("valid_loss" in r for r in logged.values())
    assert "neox_tiny_mc/acc" in proc.stdout + proc.stderr  # the evaluation's log line
    lm = LanguageModel.from_checkpoint(str(tmp_path / "run" / "ck" / "global_step4"), device="cpu")
    alone = task_metrics(run_tasks(lm, ["neox_tiny_mc", "neox_tiny_ppl"], ROOT / "tests" / "data" / "lm_eval"))
    assert alone["neox_tiny_mc/acc"] == logged[4]["neox_tiny_mc/acc"]
    for metric in ("bits_per_byte", "word_perplexity"):
        assert alone[f"neox_tiny_ppl/{metric}"] == pytest.approx(logged[4][f"neox_tiny_ppl/{metric}"], rel=1e-5)
    assert logged[2]["neox_tiny_ppl/bits_per_byte"] != logged[4]["neox_tiny_ppl/bits_per_byte"]
    plain = deepy_train(tmp_path / "plain", tmp_path / "docs", *common)
    assert plain.returncode == 0, plain.stdout[-3000:]
    assert losses(tmp_path / "plain") == losses(tmp_path / "run")  # the same steps, to the bit


@pytest.mark.parametrize(("overrides", "message"), [
    (["pipe_parallel_size=2", "zero_optimization.stage=1"], "eval_tasks runs lm-eval on the training model without"),
    (["model_parallel_size=2"], "pipe_parallel_size 1, model_parallel_size 2"),
    (["tokenizer_type=null", "vocab_file=null", "vocab_size=256"], "eval_tasks needs a tokenizer"),
    (["eval_tasks_include_path=/nowhere"], "eval_tasks_include_path /nowhere: no such folder"),
    (["eval_iters=0"], "eval_iters 0 turns evaluation off"),
    (["eval_tasks_limit=3"], "eval_tasks_limit 3 is below the data parallel size 4"),
])
def test_layouts_eval_tasks_cannot_run_are_refused_at_config_time(overrides, message):
    spm = ROOT / "configs" / "llama2" / "tiny.yml"
    with pytest.raises(ConfigError, match=message):
        load_config([spm], [*TASKS, *overrides], world_size=4)
