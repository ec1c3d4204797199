"""LoRA on every layout: pipeline (2 stages, activation checkpointing), tensor parallel (2 ranks), ZeRO 2 and 3
at data parallel 2, and tied embeddings, each following one rank over three steps; the base stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers.launches import Case, register
from helpers.peft_layouts import TIED, UNTIED, base_checkpoint, layout_args, read_layout

pytestmark = pytest.mark.dist

LAYOUTS = {
    "pp2-checkpointed": (UNTIED, ["pipe_parallel_size=2", "checkpoint_activations=true"]),
    "tp2-checkpointed": (UNTIED, ["model_parallel_size=2", "checkpoint_activations=true"]),
    "zero2-dp2": (UNTIED, ["num_gpus=2", "zero_optimization.stage=2"]),
    "zero3-dp2": (UNTIED, ["num_gpus=2", "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]),
    "pp2-tied-checkpointed": (TIED, ["pipe_parallel_size=2", "checkpoint_activations=true"]),
    "tp2-tied": (TIED, ["model_parallel_size=2"]),
}
NAMES = {UNTIED: "untied", TIED: "tied"}
for (_preset, _targets), _name in NAMES.items():  # the one-rank references (ZeRO 0), run in the test process
    register(Case(f"lora-one-{_name}", 1, "lora_steps", layout_args(_preset, _targets, ["zero_optimization.stage=0"])))
for _name, ((_preset, _targets), _layout) in LAYOUTS.items():
    register(Case(f"lora-{_name}", 2, "lora_steps", layout_args(_preset, _targets, _layout)))


@pytest.mark.parametrize("case", [f"lora-{name}" for name in LAYOUTS], ids=list(LAYOUTS))
def test_lora_layouts_follow_one_rank(launched, case):
    (preset, targets), _ = LAYOUTS[case.removeprefix("lora-")]
    _, base_tensors = base_checkpoint(preset)
    ref_losses, ref_weights = read_layout(launched(f"lora-one-{NAMES[(preset, targets)]}"), 1)
    losses, weights = read_layout(launched(case), 2)
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
