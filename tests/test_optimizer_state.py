"""The layout-free optimizer state goes into every kind of engine: one case per kind (torch's optimizer at ZeRO stage
0 on one rank, a pipeline, ZeRO 1 and 2, the BF16 optimizer, ZeRO-3, ZeRO-Offload's DeepSpeedCPUAdam, tensor-parallel shards),
each failing if a setter silently does nothing (tests/workers/optimizer_state.py)."""

from __future__ import annotations

import json

import pytest
from helpers.launches import Case, register
from helpers.runner import ROOT

pytestmark = pytest.mark.dist

COMMON = ["vocab_size=256", "seq_length=16", "train_batch_size=8", "train_micro_batch_size_per_gpu=2",
          "gradient_accumulation_steps=null", "seed=11"]
KINDS = {  # name -> (overrides, the engine's optimizer, the torch optimizer beneath, DeepSpeed maps parameters)
    "stage0-1rank": (["precision=fp32"], "AdamW", "AdamW", False),
    "pp2": (["pipe_parallel_size=2", "zero_optimization.stage=1", "precision=fp32"],
            "DeepSpeedZeroOptimizer", "AdamW", True),
    "zero1-dp2": (["num_gpus=2", "zero_optimization.stage=1", "precision=fp32"],
                  "DeepSpeedZeroOptimizer", "AdamW", True),
    "zero2-dp2-bf16": (["num_gpus=2", "zero_optimization.stage=2", "precision=bf16"],
                       "DeepSpeedZeroOptimizer", "AdamW", True),
    "bf16-optimizer-dp2": (["num_gpus=2", "zero_optimization.stage=1", "precision=bf16"],
                           "BF16_Optimizer", "AdamW", True),
    "zero3-dp2": (["num_gpus=2", "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0",
                   "precision=fp32"], "DeepSpeedZeroOptimizer_Stage3", "AdamW", True),
    "offload-dp2": (["num_gpus=2", "zero_optimization.stage=2", "zero_optimization.offload_optimizer=cpu",
                     "precision=fp32"], "DeepSpeedZeroOptimizer", "DeepSpeedCPUAdam", True),
    "tp2": (["model_parallel_size=2", "zero_optimization.stage=1", "precision=fp32"],
            "DeepSpeedZeroOptimizer", "AdamW", True),
}
WORLD = {"stage0-1rank": 1}
"""Ranks per case (2 unless named): one fp32 rank runs ZeRO stage 0, where each parameter is its own master."""
for _name, (_layout, *_) in KINDS.items():
    register(Case(f"optimizer-state-{_name}", WORLD.get(_name, 2), "optimizer_state",
                  lambda folder, lay=_layout: [folder, ROOT / "configs/llama3/tiny.yml", *COMMON, *lay]))


@pytest.mark.parametrize("case", [f"optimizer-state-{n}" for n in KINDS])
def test_every_setter_reaches_the_optimizers_own_state(launched, case):
    outcome = launched(case).check()
    _, optimizer, basic, mapped = KINDS[case.removeprefix("optimizer-state-")]
    for rank in range(WORLD.get(case.removeprefix("optimizer-state-"), 2)):
        result = json.loads((outcome.folder / f"rank{rank}.json").read_text())
        assert (result["optimizer"], result["basic"], result["mapped"]) == (optimizer, basic, mapped), result
        assert result["keys"] == ["exp_avg", "exp_avg_sq"] and result["step"] == 7
        assert result["wrong"] == [], result["wrong"][:5]  # read back what was set
        for held, expected in zip(result["held"], result["expected"], strict=True):  # and the optimizer holds it
            assert held == pytest.approx(expected, rel=1e-9), (held, expected)
