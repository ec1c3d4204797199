"""Adapter and Adapter v2 on other layouts: tensor parallel (2 ranks; the per-layer gate's gradient summed over the
group, the per-head gate split by heads), a 2-stage pipeline with activation checkpointing and ZeRO-3 at data
parallel 2 follow one rank over three steps; what the method does not train stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers.launches import Case, register
from helpers.peft_layouts import COMMON, UNTIED, base_checkpoint, layout_args, read_layout

from neox_llama.peft.adapter import AdapterSettings, is_adapter_tensor

pytestmark = pytest.mark.dist

ADAPTER = [k for k in COMMON if not k.startswith("lora_")] + ["adapter_prompt_length=3", "adapter_start_layer=0"]
PRESET = UNTIED[0]
METHODS = {
    "v2-per-layer": ["peft_method=adapter_v2", "adapter_gate=per_layer"],
    "v1-per-head": ["peft_method=adapter", "adapter_gate=per_head"],
}
LAYOUTS = {
    "v2-tp2": ("v2-per-layer", ["model_parallel_size=2"]),
    "v2-pp2-checkpointed": ("v2-per-layer", ["pipe_parallel_size=2", "checkpoint_activations=true"]),
    "v2-zero3-dp2": ("v2-per-layer", ["num_gpus=2", "zero_optimization.stage=3",
                                      "zero_optimization.stage3_param_persistence_threshold=0"]),
    "v1-per-head-tp2-checkpointed": ("v1-per-head", ["model_parallel_size=2", "checkpoint_activations=true"]),
}
for _method, (_peft, _gate) in METHODS.items():  # the one-rank runs of each method, in the test process
    register(Case(f"adapter-one-{_method}", 1, "lora_steps", layout_args(PRESET, _peft, [_gate], ADAPTER)))
for _name, (_method, _layout) in LAYOUTS.items():
    register(Case(f"adapter-{_name}", 2, "lora_steps",
                  layout_args(PRESET, METHODS[_method][0], [METHODS[_method][1], *_layout], ADAPTER)))


@pytest.mark.parametrize("case", [f"adapter-{name}" for name in LAYOUTS], ids=list(LAYOUTS))
def test_adapter_layouts_follow_one_rank(launched, case):
    method, _ = LAYOUTS[case.removeprefix("adapter-")]
    _, base_tensors = base_checkpoint(PRESET)
    ref_losses, ref_weights = read_layout(launched(f"adapter-one-{method}"), 1)
    losses, weights = read_layout(launched(case), 2)
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
