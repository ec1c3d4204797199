"""Adapter and Adapter v2 on other layouts: tensor parallel (2 ranks; the per-layer gate's gradient summed over the
group, the per-head gate split by heads), a 2-stage pipeline with activation checkpointing and ZeRO-3 at data
parallel 2 follow one rank over three steps; what the method does not train stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from test_lora_layouts import COMMON, UNTIED, base_checkpoint, run_layout

from neox_llama.model.adapter import AdapterSettings, is_adapter_tensor

pytestmark = pytest.mark.dist

ADAPTER = [k for k in COMMON if not k.startswith("lora_")] + ["adapter_prompt_length=3", "adapter_start_layer=0"]
PRESET = UNTIED[0]
METHODS = {
    "v2-per-layer": ["peft_method=adapter_v2", "adapter_gate=per_layer"],
    "v1-per-head": ["peft_method=adapter", "adapter_gate=per_head"],
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The base checkpoint, its tensors, and the one-rank run of each method."""
    tmp = tmp_path_factory.mktemp("ref")
    model = base_checkpoint(tmp / "base", PRESET)
    base_tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    runs = {name: run_layout(tmp, name, tmp / "base", PRESET, method[0], 1, [method[1]], ADAPTER)
            for name, method in METHODS.items()}
    return tmp / "base", base_tensors, runs


@pytest.mark.parametrize(("method", "layout"), [
    ("v2-per-layer", ["model_parallel_size=2"]),
    ("v2-per-layer", ["pipe_parallel_size=2", "checkpoint_activations=true"]),
    ("v2-per-layer", ["num_gpus=2", "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]),
    ("v1-per-head", ["model_parallel_size=2", "checkpoint_activations=true"]),
], ids=["v2-tp2", "v2-pp2-checkpointed", "v2-zero3-dp2", "v1-per-head-tp2-checkpointed"])
def test_adapter_layouts_follow_one_rank(tmp_path, references, method, layout):
    base, base_tensors, runs = references
    ref_losses, ref_weights = runs[method]
    losses, weights = run_layout(tmp_path, "layout", base, PRESET, METHODS[method][0], 2,
                                 [METHODS[method][1], *layout], ADAPTER)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # the adapters learn (v1 slowly: its gates start at zero)
    assert set(weights) == set(ref_weights)
    settings = AdapterSettings(METHODS[method][0].split("=")[1], 3, 0, METHODS[method][1].split("=")[1])
    trained = [n for n in weights if is_adapter_tensor(n.split(".", 1)[1], settings)]
    assert any(n.endswith(".adapter.gate") for n in trained) and any(n.endswith(".adapter.prompt") for n in trained)
    for name in trained:
        assert (weights[name] - ref_weights[name]).abs().max().item() <= 2e-5, name
        if name.endswith(".adapter.gate"):
            assert weights[name].abs().min() > 0, name  # opened from zero
    for name, tensor in base_tensors.items():
        if name not in trained:  # the frozen base: bit-identical after training
            assert torch.equal(weights[name], tensor), name
