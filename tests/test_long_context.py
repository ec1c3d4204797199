"""Fine-tuning past the context a checkpoint was trained for: refused without rope_scaling, trained with it (yarn,
4x), and the result exports to Hugging Face with equal logits at the long length."""

from __future__ import annotations

import pytest
import torch
import transformers  # a pinned requirement: fail, never skip, without it
from helpers import inprocess
from helpers.training import deepy_train, losses

from neox_llama.checkpoint.run import load_model

pytestmark = pytest.mark.dist

LONG = ["finetune=true", "seq_length=128", "max_position_embeddings=128", "train_iters=2", "checkpoint_factor=2",
        "train_micro_batch_size_per_gpu=2"]


def test_fine_tuning_beyond_the_trained_context_needs_rope_scaling_and_matches_transformers(tmp_path, corpus):
    base = tmp_path / "base"
    proc = deepy_train(base, corpus, "train_iters=2", "checkpoint_factor=2", "max_position_embeddings=32")
    assert proc.returncode == 0, proc.stderr[-3000:]

    plain = deepy_train(tmp_path / "plain", corpus, *LONG, f"load={base / 'ck'}")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert "seq_length 128 is beyond the max_position_embeddings 32 that" in plain.stderr
    assert "without rope_scaling: set rope_scaling (e.g. {rope_type: yarn, factor: 4, " \
           "original_max_position_embeddings: 32})" in plain.stderr

    long = tmp_path / "long"
    yarn = "rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 32}"
    proc = deepy_train(long, corpus, *LONG, yarn, f"load={base / 'ck'}", f"save={long / 'ck'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fine-tuning from" in proc.stderr and len(losses(long)) == 2
    assert all(loss == loss and loss < 10 for loss in losses(long))  # finite, and not diverged

    export = inprocess.tool("convert_to_hf.py", "--checkpoint", str(long / "ck"), "--output", str(tmp_path / "hf"),
                            "--dtype", "fp32")
    assert export.returncode == 0, export.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.max_position_embeddings == 128
    ours, run = load_model(long / "ck")
    ids = torch.randint(0, run.true_vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids)[..., : run.true_vocab] - hf(ids).logits).abs().max().item() <= 1e-4
