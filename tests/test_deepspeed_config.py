"""The DeepSpeed engine config is derived from the schema, and DeepSpeed's own parser accepts it."""

from __future__ import annotations

import pytest

from neox_llama.config import deepspeed_config, load_config

TINY = "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nintermediate_size: 192\nseq_length: 32\nvocab_size: 500\n"


def test_values_come_from_the_schema(write_yaml):
    cfg = load_config([write_yaml("a.yml", TINY)], [
        "train_batch_size=16", "gradient_accumulation_steps=2", "gradient_clipping=0.5", "precision=bf16",
        "zero_optimization.stage=2", "optimizer.params.lr=2e-4", "optimizer.params.weight_decay=0.05",
        "wall_clock_breakdown=true"], world_size=4)
    ds = deepspeed_config(cfg)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["wall_clock_breakdown"] is True
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 2
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["lr"] == pytest.approx(2e-4)
    assert params["weight_decay"] == pytest.approx(0.05) and params["adam_w_mode"] is True
    assert params["torch_adam"] is True  # on CPU: torch's AdamW, nothing to compile


def test_fp16_section_on_gpu_and_plain_adam(write_yaml):
    cfg = load_config([write_yaml("a.yml", TINY)], ["precision=fp16", "initial_scale_power=12", "hysteresis=3",
                                                    "optimizer.type=Adam"], accelerator="cuda")
    ds = deepspeed_config(cfg, accelerator="cuda")
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 12, "loss_scale_window": 1000,
                          "hysteresis": 3, "min_loss_scale": 1.0}
    assert ds["optimizer"]["params"]["adam_w_mode"] is False and "torch_adam" not in ds["optimizer"]["params"]


def test_fp32_has_no_mixed_precision_section(write_yaml):
    ds = deepspeed_config(load_config([write_yaml("a.yml", TINY)], ["precision=fp32"]))
    assert "bf16" not in ds and "fp16" not in ds


def test_deepspeed_parses_the_derived_config(write_yaml):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config([write_yaml("a.yml", TINY)], ["train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=3",
                                                    "zero_optimization.stage=1"])
    parsed = DeepSpeedConfig(deepspeed_config(cfg))
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (6, 2, 3)
    assert parsed.zero_optimization_stage == 1 and parsed.bfloat16_config.enabled
    assert parsed.gradient_clipping == 1.0


@pytest.mark.parametrize(("overrides", "world", "runs"), [
    (["zero_optimization.stage=1"], 1, 0), (["zero_optimization.stage=2"], 1, 0),
    (["zero_optimization.stage=1"], 2, 1), (["zero_optimization.stage=1", "pipe_parallel_size=2"], 2, 1),
    (["zero_optimization.stage=2", "zero_optimization.offload_optimizer=cpu"], 1, 2),
    (["zero_optimization.stage=3"], 1, 3), (["zero_optimization.stage=1", "precision=bf16"], 1, 1)],
    ids=["z1", "z2", "z1-dp2", "z1-pp2", "z2-offload", "z3", "z1-bf16"])
def test_one_rank_runs_zero_0_where_there_is_nothing_to_partition(write_yaml, overrides, world, runs):
    from neox_llama.config import zero_text

    cfg = load_config([write_yaml("a.yml", TINY)], ["precision=fp32", *overrides], world_size=world)
    assert cfg.derived.engine_zero_stage == runs == deepspeed_config(cfg)["zero_optimization"]["stage"]
    stage = cfg.zero_optimization.stage
    assert zero_text(cfg) == (str(stage) if runs == stage else f"{stage} (runs as 0: one rank has nothing to partition in fp32)")
