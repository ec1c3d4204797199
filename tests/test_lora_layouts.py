"""LoRA on every layout: pipeline (2 stages, activation checkpointing), tensor parallel (2 ranks), ZeRO 2 and 3
at data parallel 2, and tied embeddings, each following one rank over three steps; the base stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import save_random_checkpoint
from helpers.runner import ROOT, launch

from neox_llama.config.loading import load_raw

pytestmark = pytest.mark.dist

WORKER = ROOT / "tests" / "workers" / "lora_steps.py"
COMMON = ["vocab_size=256", "seq_length=16", "precision=fp32", "train_batch_size=8", "train_micro_batch_size_per_gpu=2",
          "gradient_accumulation_steps=null", "gradient_clipping=0.5", "seed=11", "optimizer.params.lr=1e-2",
          "optimizer.params.eps=1e-5", "load=unused", "finetune=true", "lora_r=4", "lora_alpha=12", "lora_dropout=0"]
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size", "seq_length",
              "rotary_emb_base", "max_position_embeddings", "no_weight_tying", "make_vocab_size_divisible_by")
UNTIED = ("configs/llama3/tiny.yml", "lora_targets=[query,key,value,output,mlp,head]")
TIED = ("configs/llama3.2/tiny.yml", "lora_targets=[query,value,output,mlp]")


def base_checkpoint(folder, preset):
    raw, _ = load_raw([ROOT / preset], apply_presets=False)
    settings = {k: raw[k] for k in MODEL_KEYS if k in raw}
    settings.update(vocab_size=256, precision="fp32")
    return save_random_checkpoint(folder, settings, seed=99)


def run_layout(tmp_path, name, base, preset, targets, ranks, layout, common=COMMON):
    out = tmp_path / name
    out.mkdir()
    proc = launch(ranks, WORKER, str(out), str(base), str(ROOT / preset), *common, targets, *layout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    merged: dict[str, torch.Tensor] = {}
    losses = None
    for rank in range(ranks):
        result = torch.load(out / f"rank{rank}.pt")
        losses = losses or result["losses"]
        assert result["losses"] == pytest.approx(losses, abs=1e-6)
        for key, tensor in result["weights"].items():
            merged.setdefault(key, tensor)
    return losses, merged


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per preset: the base checkpoint, its tensors, and the one-rank LoRA run (ZeRO 0)."""
    out = {}
    for preset, targets in (UNTIED, TIED):
        tmp = tmp_path_factory.mktemp("ref")
        base = tmp / "base"
        model = base_checkpoint(base, preset)
        base_tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        out[preset] = (base, base_tensors, run_layout(tmp, "one", base, preset, targets, 1, ["zero_optimization.stage=0"]))
    return out


@pytest.mark.parametrize(("preset", "targets", "ranks", "layout"), [
    (*UNTIED, 2, ["pipe_parallel_size=2", "checkpoint_activations=true"]),
    (*UNTIED, 2, ["model_parallel_size=2", "checkpoint_activations=true"]),
    (*UNTIED, 2, ["num_gpus=2", "zero_optimization.stage=2"]),
    (*UNTIED, 2, ["num_gpus=2", "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]),
    (*TIED, 2, ["pipe_parallel_size=2", "checkpoint_activations=true"]),
    (*TIED, 2, ["model_parallel_size=2"]),
], ids=["pp2-checkpointed", "tp2-checkpointed", "zero2-dp2", "zero3-dp2", "pp2-tied-checkpointed", "tp2-tied"])
def test_lora_layouts_follow_one_rank(tmp_path, references, preset, targets, ranks, layout):
    base, base_tensors, (ref_losses, ref_weights) = references[preset]
    losses, weights = run_layout(tmp_path, "layout", base, preset, targets, ranks, layout)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0] - 0.01  # the adapters learn
    assert set(weights) == set(ref_weights)
    adapters = [n for n in weights if ".lora." in n]
    assert adapters and all(n.endswith((".lora.a", ".lora.b")) for n in adapters)
    for name in adapters:
        assert (weights[name] - ref_weights[name]).abs().max().item() <= 2e-5, name  # Adam amplifies fp32 noise
    for name, tensor in base_tensors.items():  # the base is frozen: bit-identical after training
        assert torch.equal(weights[name], tensor), name
    assert any(ref_weights[n].abs().max() > 0 for n in adapters if n.endswith(".lora.b"))  # B moved off zero
