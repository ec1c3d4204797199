"""Adapter v2 fine-tuning through deepy.py under ZeRO-3: self-describing adapter checkpoints at every step (only the
trained tensors), an exact resume by re-running the same command, and generate.py / evaluate.py with --adapter equal
to the checkpoint opened alone."""

from __future__ import annotations

import json

import pytest
from helpers import inprocess
from helpers.finetune import deepy, metrics, ok
from helpers.runner import ROOT

from neox_llama.checkpoint.metadata import read_metadata
from neox_llama.checkpoint.weights import read_layer_file

pytestmark = pytest.mark.dist

ADAPTER_V2 = ["peft_method=adapter_v2", "adapter_prompt_length=4", "adapter_start_layer=1", "val_split_fraction=0.2",
              "prompt_style=alpaca", "optimizer.params.lr=1e-2", "lr_decay_iters=4", "checkpoint_factor=2", "eval_interval=100",
              # ZeRO-3: v2 trains the norms, base tensors that are partitions; resuming fills them gathered
              "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.fixture(scope="module")
def setup(finetune_setup, tmp_path_factory):
    """This module's work folder, and the session's records, tokenizer and base checkpoint (conftest)."""
    _, data, tokenizer, base = finetune_setup
    return tmp_path_factory.mktemp("ft"), data, tokenizer, base


def tool(name, *args):
    """``python tools/NAME ARGS`` from the repository root, run in this process."""
    return inprocess.tool(name, *args, cwd=ROOT)


def test_adapter_v2_checkpoints_resume_exactly_and_generate_and_evaluate_with_adapter(setup):
    tmp, data, tokenizer, base = setup
    common = ["finetune=true", f"load={base}", f"sft_data_path={data}", *ADAPTER_V2]
    straight = tmp / "straight"
    proc = ok(deepy(straight, tokenizer, *common, "train_iters=4"))
    assert "fine-tuning from Adapter v2: 4 prompt tokens from block 1, gate per layer on the frozen weights" in proc.stderr
    step2 = straight / "global_step2"
    meta = read_metadata(step2)
    assert meta.adapter == {"method": "adapter_v2", "prompt_length": 4, "start_layer": 1, "gate": "per_layer"}
    assert meta.lora is None and meta.base.path == str(base.resolve()) and not (step2 / "weights").exists()
    names = {n for f in (step2 / "adapter").iterdir() for n in read_layer_file(f)}
    assert "attention.adapter.prompt" in names and "attention.adapter.gate" in names  # block 1 (layer 2)
    assert {"attention.query.adapter.scale", "mlp.down.adapter.bias", "input_norm.weight", "norm.weight",
            "head.adapter.scale"} <= names
    assert not any(n.endswith(("query.weight", "word_embeddings.weight")) for n in names)  # no frozen tensor saved

    stopped = tmp / "stopped"
    ok(deepy(stopped, tokenizer, *common, "train_iters=2"))
    resumed = ok(deepy(stopped, tokenizer, *common, "train_iters=4"))  # longer (same schedule): resumes at 2
    assert f"resumed from {stopped / 'global_step2'} at step 2" in resumed.stderr
    assert [r["loss"] for r in metrics(stopped)] == [r["loss"] for r in metrics(straight)]  # exactly equal

    step4 = straight / "global_step4"
    prompt = ["--prompt", "Repeat the words: apple river stone", "--max-new-tokens", "12", "--temperature", "0"]
    with_adapter = tool("generate.py", "--checkpoint", str(base), "--adapter", str(step4), *prompt)
    alone = tool("generate.py", "--checkpoint", str(step4), *prompt)
    assert with_adapter.returncode == 0, with_adapter.stderr
    assert with_adapter.stdout == alone.stdout
    scores = []
    for args in (["--checkpoint", str(base), "--adapter", str(step4)], ["--checkpoint", str(step4)],
                 ["--checkpoint", str(base)]):
        out = tmp / f"eval{len(scores)}.json"
        proc = tool("evaluate.py", *args, "--jsonl", str(data.parent / "text.jsonl"), "--output", str(out),
                    "--no-progress")
        assert proc.returncode == 0, proc.stderr
        scores.append(json.loads(out.read_text())["loss"])
    assert scores[0] == scores[1] != scores[2]
