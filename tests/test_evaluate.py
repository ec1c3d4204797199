"""tools/evaluate.py: perplexity equal to transformers' sliding-window recipe, bits per byte by hand, the run's
own test split found, adapters evaluated, and bad inputs as one line."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from helpers import inprocess
from helpers.evaluation import TEXT
from helpers.runner import ROOT, run

from neox_llama.convert.hf_export import export_to_hf
from neox_llama.generation.language_model import LanguageModel, sliding_windows
from neox_llama.tokenizers import build_tokenizer


@pytest.fixture
def checkpoint(eval_checkpoint):
    """The session's evaluation checkpoint folder (conftest): ck, tok.model, docs."""
    return eval_checkpoint


def tool(*args):
    """``python tools/evaluate.py ARGS --no-progress`` from the repository root, run in this process."""
    return inprocess.tool("evaluate.py", *map(str, args), "--no-progress", cwd=ROOT)


def process(*args):
    """``python tools/evaluate.py ARGS --no-progress`` in a process of its own."""
    return run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *map(str, args), "--no-progress"])


@pytest.mark.parametrize(("n", "length", "stride"), [(10, 4, 2), (10, 4, 4), (7, 8, 4), (33, 16, 5), (2, 4, 2)])
def test_sliding_windows_score_each_token_once(n, length, stride):
    windows = sliding_windows(list(range(n)), length, stride)
    scored = [w.ids[k] for w in windows for k in range(w.first_scored, len(w.ids))]
    assert all(len(w.ids) <= length for w in windows)
    assert len(scored) == len(set(scored))
    unscored = set(range(n)) - set(scored)
    if stride < length:
        assert unscored == {0}  # every token after the first is scored with context
    else:
        assert unscored == set(range(0, n, length))  # independent windows: each window's first token


@pytest.mark.parametrize(("length", "stride"), [(32, 16), (24, 24)])
def test_perplexity_equals_transformers_sliding_window(checkpoint, tmp_path, length, stride):
    from transformers import AutoModelForCausalLM

    export_to_hf(checkpoint / "ck", tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    lm = LanguageModel.from_checkpoint(str(checkpoint / "ck"), device="cpu")
    ids = torch.tensor([lm.tokenizer.encode_document(TEXT)])
    # Hugging Face's perplexity recipe (docs: "Perplexity of fixed-length models"), summing nats per window
    nlls, counted, prev_end = [], 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + length, ids.size(1))
        target = ids[:, begin:end].clone()
        target[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            out = hf(ids[:, begin:end], labels=target)
        valid = int((target[:, 1:] != -100).sum())
        nlls.append(out.loss.item() * valid)
        counted += valid
        prev_end = end
        if end == ids.size(1):
            break
    expected = sum(nlls) / counted
    proc = tool("--checkpoint", checkpoint / "ck", "--text", _text(tmp_path),
                "--seq-length", length, "--stride", stride, "--output", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == counted
    assert abs(result["loss"] - expected) <= 1e-4 * expected
    assert abs(result["perplexity"] - math.exp(expected)) <= 1e-4 * math.exp(expected)
    assert result["bytes"] == len(TEXT.encode("utf-8"))
    assert "perplexity" in proc.stdout and "bits per byte" in proc.stdout


def _text(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_bits_per_byte_by_hand(checkpoint, tmp_path):
    from neox_llama.evaluation.perplexity import evaluate_documents, text_documents

    text = "naïve café: ok"  # multi-byte characters: bytes, not characters, count
    lm = LanguageModel.from_checkpoint(str(checkpoint / "ck"), device="cpu")
    ids = lm.tokenizer.encode_document(text)
    nats = -float(lm.token_logprobs([ids])[0].double().sum())
    result = evaluate_documents(lm, text_documents(lm, [text]), 32, 16, progress=False)
    assert result.tokens == len(ids) - 1 and result.bytes == 16 == len(text) + 2  # ï and é are two bytes each
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / 16, rel=1e-9)
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / math.log(2) / result.bytes, rel=1e-9)


def test_the_runs_test_split_is_found_and_scored(checkpoint, tmp_path):
    # a real process: the tool's script path itself
    proc = process("--checkpoint", checkpoint / "ck", "--output", tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["documents"] == 1 and result["tokens"] > 0  # split 8,1,1 of 10 documents
    tok = build_tokenizer("SPMTokenizer", checkpoint / "tok.model")
    assert result["bytes"] == len(tok.decode(tok.encode_document("Document 9: " + TEXT[:141])).encode("utf-8"))
    every = tool("--checkpoint", checkpoint / "ck", "--data-path", checkpoint / "docs", "--output", tmp_path / "a.json")
    assert every.returncode == 0 and json.loads((tmp_path / "a.json").read_text())["documents"] == 10


def test_bad_inputs_are_one_line(checkpoint, tmp_path):
    for args, message in (
        (["--checkpoint", tmp_path / "none"], "checkpoint directory not found"),
        (["--checkpoint", checkpoint / "ck", "--text", tmp_path / "missing.txt"], "missing.txt: cannot read it"),
        (["--checkpoint", checkpoint / "ck", "--text", _text(tmp_path), "--seq-length", "500"],
         "exceeds the model's context of 64 tokens"),
        (["--checkpoint", checkpoint / "ck", "--text", _text(tmp_path), "--seq-length", "8", "--stride", "9"],
         "--stride 9 is longer than the window 8"),
    ):
        proc = tool(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    proc = tool("--checkpoint", checkpoint / "ck", "--jsonl", tmp_path / "bad.jsonl")
    assert proc.returncode == 2 and "line 2 has no string field 'text'" in proc.stderr


def test_a_lone_surrogate_is_scored_as_the_replacement_character(checkpoint, tmp_path):
    """docs/tokenizers.md: text no tokenizer can take is read as U+FFFD, its bytes counted as U+FFFD's."""
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "the cat \ud800 sat"}) + "\n")
    (tmp_path / "fixed.jsonl").write_text(json.dumps({"text": "the cat \ufffd sat"}) + "\n")
    odd = tool("--checkpoint", checkpoint / "ck", "--jsonl", tmp_path / "odd.jsonl")
    fixed = tool("--checkpoint", checkpoint / "ck", "--jsonl", tmp_path / "fixed.jsonl")
    assert odd.returncode == 0 and "Traceback" not in odd.stderr, odd.stderr
    assert odd.stdout == fixed.stdout and fixed.returncode == 0


def test_a_lora_checkpoint_evaluates_as_its_merged_model(checkpoint, tmp_path):
    from helpers.lora import SETTINGS as LORA
    from helpers.lora import adapter_checkpoint

    from neox_llama.checkpoint.merge import Adapter, merge_to_checkpoint

    adapter = adapter_checkpoint(tmp_path / "lora", checkpoint / "ck", LORA, seed=4)
    merged = merge_to_checkpoint([Adapter.open(adapter)], tmp_path / "merged")
    text = _text(tmp_path)
    results = []
    for args in (["--checkpoint", adapter], ["--checkpoint", checkpoint / "ck", "--adapter", adapter],
                 ["--checkpoint", merged], ["--checkpoint", checkpoint / "ck"]):
        proc = tool(*args, "--text", text, "--output", tmp_path / "x.json")
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads((tmp_path / "x.json").read_text())["loss"])
    assert results[0] == results[1] == results[2] != results[3]


def local_task(tmp_path):
    """The repository's local multiple-choice task, its data file path made absolute."""
    data = ROOT / "tests" / "data" / "lm_eval"
    (tmp_path / "tasks").mkdir(parents=True)
    text = (data / "neox_tiny_mc.yaml").read_text().replace("tests/data/lm_eval/neox_tiny_mc.jsonl",
                                                           str(data / "neox_tiny_mc.jsonl"))
    (tmp_path / "tasks" / "neox_tiny_mc.yaml").write_text(text)
    return tmp_path / "tasks"


def test_lm_eval_adapter_equals_the_hf_backend_on_our_export(checkpoint, tmp_path):
    import lm_eval  # noqa: F401 (a pinned requirement: fail, never skip, without it)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from neox_llama.evaluation.harness import run_tasks

    tasks = local_task(tmp_path)
    lm = LanguageModel.from_checkpoint(str(checkpoint / "ck"), device="cpu")
    ours = run_tasks(lm, ["neox_tiny_mc"], include_path=tasks, batch_size=4, log_samples=True)
    export_to_hf(checkpoint / "ck", tmp_path / "hf", dtype="fp32")
    from lm_eval.models.huggingface import HFLM

    theirs = simple_evaluate(model=HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", batch_size=4, device="cpu"),
                             tasks=["neox_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)),
                             log_samples=True, batch_size=4)
    a, b = ours["samples"]["neox_tiny_mc"], theirs["samples"]["neox_tiny_mc"]
    assert len(a) == len(b) == 6
    for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"]), strict=True):
        for (lx, gx), (ly, gy) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"]), strict=True):
            assert abs(float(lx) - float(ly)) <= 1e-4 * max(1.0, abs(float(ly))) and bool(gx) == bool(gy)
    assert ours["results"]["neox_tiny_mc"]["acc,none"] == theirs["results"]["neox_tiny_mc"]["acc,none"]


def test_evaluate_tasks_command_line_with_an_adapter(checkpoint, tmp_path):
    import lm_eval  # noqa: F401 (a pinned requirement: fail, never skip, without it)
    from helpers.lora import SETTINGS as LORA
    from helpers.lora import adapter_checkpoint

    adapter = adapter_checkpoint(tmp_path / "lora", checkpoint / "ck", LORA, seed=4)
    proc = tool("--checkpoint", adapter, "--tasks", "neox_tiny_mc", "--include-path", local_task(tmp_path),
                "--output", tmp_path / "tasks.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tasks.json").read_text())
    assert 0.0 <= result["results"]["neox_tiny_mc"]["acc,none"] <= 1.0
    assert "neox_tiny_mc" in proc.stdout and "acc" in proc.stdout
    bad = tool("--checkpoint", checkpoint / "ck", "--tasks", "no_such_task", "--include-path", local_task(tmp_path / "x"))
    assert bad.returncode == 2 and "no_such_task" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
