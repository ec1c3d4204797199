"""lm-eval tasks during training (eval_tasks): run on the training engine's model over data-parallel ranks (ZeRO-3,
so every rank must run as many forward passes as the others), logged beside valid_loss, and equal to evaluating the
checkpoint saved at the same step; layouts the facade cannot run are refused at config time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import training
from helpers.evaluation import TEXT
from helpers.launches import Case, completed, register
from helpers.runner import ROOT
from helpers.training import deepy_args, losses, records

from neox_llama.config import ConfigError, load_config
from neox_llama.data.indexed import IndexedDatasetWriter
from neox_llama.evaluation.harness import run_tasks
from neox_llama.generation.language_model import LanguageModel
from neox_llama.tokenizers import build_tokenizer
from neox_llama.tokenizers.train import train_sentencepiece
from neox_llama.training.eval_tasks import task_metrics

TASKS = ["eval_tasks=[neox_tiny_mc,neox_tiny_ppl]", f"eval_tasks_include_path={ROOT / 'tests' / 'data' / 'lm_eval'}"]


_INPUTS: dict[str, Path] = {}


def inputs() -> tuple[Path, Path]:
    """The tokenizer and the 40-document dataset that both runs train on, written once per session."""
    if not _INPUTS:
        folder = training.SESSION_DIR / "eval_tasks"
        folder.mkdir()
        (folder / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
        tokenizer = train_sentencepiece([folder / "text.jsonl"], folder / "tok", 320)
        tok = build_tokenizer("SPMTokenizer", tokenizer)
        with IndexedDatasetWriter(folder / "docs", np.uint16) as writer:
            for i in range(40):
                writer.add_document(tok.encode_document(TEXT[i * 7:] + TEXT[: i * 7]))
        _INPUTS.update(tokenizer=tokenizer, docs=folder / "docs")
    return _INPUTS["tokenizer"], _INPUTS["docs"]


def run_args(folder: Path, *extra: str) -> list[str]:
    """deepy.py's arguments for a 2-rank ZeRO-3 run into ``folder`` (the case's) on :func:`inputs`."""
    tokenizer, docs = inputs()
    # Batches of one and a document longer than the context: the ranks score different numbers of windows, and
    # under ZeRO-3 must still run the same number of forward passes. Dropout on: lm-eval must not change training.
    common = ["tokenizer_type=SPMTokenizer", f"vocab_file={tokenizer}", "vocab_size=null", "num_gpus=2",
              "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0", "train_iters=4",
              "eval_interval=2", "checkpoint_factor=4", "train_micro_batch_size_per_gpu=2",
              "gradient_accumulation_steps=1", "train_batch_size=null", "hidden_dropout=0.1", "attention_dropout=0.1"]
    return deepy_args(folder, docs, *common, *extra)


# the two runs: cases of the shared 2-rank launch (helpers.launches)
register(Case("eval-tasks-run", 2, "train", lambda folder: run_args(folder, *TASKS, "eval_tasks_batch_size=1")))
register(Case("eval-tasks-plain", 2, "train", lambda folder: run_args(folder)))


@pytest.mark.dist
@pytest.mark.uses_cases("eval-tasks-run", "eval-tasks-plain")
def test_eval_tasks_during_training_equal_the_checkpoints_evaluation(launched):
    run = launched("eval-tasks-run").folder
    proc = completed(launched("eval-tasks-run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {r["step"]: r for r in records(run, "neox_tiny_mc/acc")}
    assert sorted(logged) == [2, 4] and all("valid_loss" in r for r in logged.values())
    assert "neox_tiny_mc/acc" in proc.stdout + proc.stderr  # the evaluation's log line
    lm = LanguageModel.from_checkpoint(str(run / "ck" / "global_step4"), device="cpu")
    alone = task_metrics(run_tasks(lm, ["neox_tiny_mc", "neox_tiny_ppl"], ROOT / "tests" / "data" / "lm_eval"))
    assert alone["neox_tiny_mc/acc"] == logged[4]["neox_tiny_mc/acc"]
    for metric in ("bits_per_byte", "word_perplexity"):
        assert alone[f"neox_tiny_ppl/{metric}"] == pytest.approx(logged[4][f"neox_tiny_ppl/{metric}"], rel=1e-5)
    assert logged[2]["neox_tiny_ppl/bits_per_byte"] != logged[4]["neox_tiny_ppl/bits_per_byte"]
    plain = completed(launched("eval-tasks-plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert losses(launched("eval-tasks-plain").folder) == losses(run)  # the same steps, to the bit


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
