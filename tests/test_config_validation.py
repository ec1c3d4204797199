"""Cross-checks between keys and derived values: each bad combination gives its own clear error."""

from __future__ import annotations

import pytest
from helpers.runner import ROOT

from neox_llama.config import ConfigError, load_config

TINY = """
num_layers: 4
hidden_size: 64
num_attention_heads: 4
num_kv_heads: 2
intermediate_size: 192
seq_length: 32
vocab_size: 500
"""


def problem(write_yaml, overrides, world_size=1, accelerator="cpu") -> str:
    base = write_yaml("base.yml", TINY)
    with pytest.raises(ConfigError) as excinfo:
        load_config([base], overrides, world_size=world_size, accelerator=accelerator)
    assert len(excinfo.value.problems) == 1, excinfo.value.problems
    return excinfo.value.problems[0]


@pytest.mark.parametrize(("overrides", "world", "expected"), [
    (["hidden_size=66"], 1, "hidden_size 66 is not divisible by num_attention_heads 4"),
    (["peft_method=adapter", "load=x", "lora_r=4"], 1, "peft_method adapter with lora_r 4: choose one method"),
    (["peft_method=adapter_v2"], 1, "peft_method adapter_v2 adapts a trained base: set load"),
    (["peft_method=adapter", "load=x", "adapter_start_layer=4"], 1,
     "adapter_start_layer 4 is not a block of the model (blocks 0-3)"),
    (["peft_method=adapter", "load=x", "freeze=[embeddings]"], 1, "with peft_method adapter the base is frozen already"),
    (["num_kv_heads=3"], 1, "num_attention_heads 4 is not divisible by num_kv_heads 3"),
    (["model_parallel_size=4"], 4, "num_kv_heads 2 is not divisible by model_parallel_size 4"),
    (["pipe_parallel_size=8"], 8, "num_layers 4 is smaller than pipe_parallel_size 8"),
    (["seq_length=64", "max_position_embeddings=48"], 1, "seq_length 64 exceeds max_position_embeddings 48"),
    (["model_parallel_size=2", "make_vocab_size_divisible_by=5", "vocab_size=501"], 2,
     "padded vocabulary 505 (vocabulary 501 rounded up to make_vocab_size_divisible_by 5) is not divisible by model_parallel_size 2"),
    (["pipe_parallel_size=2", "zero_optimization.stage=2"], 2,
     "zero_optimization.stage 2 with pipe_parallel_size 2: DeepSpeed supports only ZeRO 0-1 with pipeline parallelism"),
    (["pipe_parallel_size=2"], 3, "world size 3 is not divisible by pipe_parallel_size 2 x model_parallel_size 1"),
    (["train_batch_size=10", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=2"], 2,
     "train_batch_size 10 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 2 x data parallel size 2 (= 8)"),
    (["train_batch_size=6", "train_micro_batch_size_per_gpu=4"], 1,
     "train_batch_size 6 is not divisible by train_micro_batch_size_per_gpu 4 x data parallel size 1"),
    (["intermediate_size=null"], 1, "intermediate_size is required with activation swiglu"),
    (["precision=fp16"], 1, "precision fp16 needs a GPU"),
    (["finetune=true"], 1, "finetune is true but load"),
    (["train_data_paths=[a, b]", "train_data_weights=[1.0]"], 1, "train_data_weights has 1 entries but train_data_paths has 2"),
    (["split=90,x"], 1, "split '90,x' must be up to three non-negative numbers"),
    (["data_path=a", "train_data_paths=[b]"], 1, "set data_path (split by `split`) or train_data_paths, not both"),
    (["min_lr=1.0"], 1, "min_lr 1.0 is above the peak rate"),
    (["optimizer.params.betas=[0.9]"], 1, "optimizer.params.betas [0.9] must be two numbers in [0, 1)"),
    (["vocab_size=null"], 1, "vocab_size is not set and there is no tokenizer"),
    (["vocab_file=tok.model"], 1, "vocab_file is set but tokenizer_type is not"),
    (["zero_optimization.offload_param=cpu"], 1, "zero_optimization.offload_param needs ZeRO stage 3"),
    (["compile=true", "zero_optimization.stage=3"], 1, "compile: true with zero_optimization.stage 3"),
    (["pos_emb=learned", "rope_scaling={factor: 8.0}"], 1, "rope_scaling needs pos_emb rotary"),
    (["rotary_pct=0.01"], 1, "rotary dimensions; it must be a positive even number"),
])
def test_bad_combination_is_one_clear_error_naming_where_it_came_from(write_yaml, overrides, world, expected):
    line = problem(write_yaml, overrides, world_size=world)
    assert expected in line
    assert line.startswith("command line:")


def test_missing_architecture_key_points_at_presets(write_yaml):
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", "vocab_size: 10\nintermediate_size: 8\n")])
    text = "\n".join(excinfo.value.problems)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        assert f"{key} is not set; list a model preset" in text


def test_fp16_is_accepted_when_a_gpu_is_present(write_yaml):
    cfg = load_config([write_yaml("a.yml", TINY)], ["precision=fp16"], accelerator="cuda")
    assert cfg.precision == "fp16"


@pytest.mark.parametrize(("overrides", "world", "micro", "gas", "total"), [
    (["train_micro_batch_size_per_gpu=4", "gradient_accumulation_steps=3"], 2, 4, 3, 24),
    (["train_batch_size=24", "train_micro_batch_size_per_gpu=4"], 2, 4, 3, 24),
    (["train_batch_size=24", "gradient_accumulation_steps=3"], 2, 4, 3, 24),
    (["train_batch_size=24"], 2, 12, 1, 24),
    (["train_micro_batch_size_per_gpu=4"], 2, 4, 1, 8),
    ([], 1, 1, 1, 1),
    (["train_batch_size=16", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=2",
      "pipe_parallel_size=2", "model_parallel_size=2"], 16, 2, 2, 16),
])
def test_any_two_batch_keys_determine_the_third(write_yaml, overrides, world, micro, gas, total):
    cfg = load_config([write_yaml("a.yml", TINY)], overrides, world_size=world)
    d = cfg.derived
    assert (d.train_micro_batch_size_per_gpu, d.gradient_accumulation_steps, d.train_batch_size) == (micro, gas, total)


def test_derived_layout_and_model_values(write_yaml):
    cfg = load_config([write_yaml("a.yml", TINY)], ["pipe_parallel_size=2", "model_parallel_size=2", "warmup=0.1",
                                                    "train_iters=200"], world_size=8)
    d = cfg.derived
    assert (d.world_size, d.data_parallel_size) == (8, 2)
    assert (d.num_kv_heads, d.head_dim, d.intermediate_size, d.max_position_embeddings) == (2, 16, 192, 32)
    assert d.padded_vocab_size == 512  # 500 rounded up to a multiple of 128
    assert (d.lr_decay_iters, d.warmup_iters) == (200, 20)


def test_gelu_defaults_to_four_times_hidden(write_yaml):
    cfg = load_config([write_yaml("a.yml", TINY)], ["activation=gelu", "intermediate_size=null"])
    assert cfg.derived.intermediate_size == 256


def test_several_cross_check_problems_are_reported_together(write_yaml):
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", TINY)], ["hidden_size=66", "pipe_parallel_size=8", "seq_length=9999",
                                                         "max_position_embeddings=64"],
                    world_size=8)
    assert len(excinfo.value.problems) == 3


def test_type_errors_and_cross_checks_are_reported_together_without_noise(write_yaml):
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", TINY)], ["num_layers=four", "pipe_parallel_size=2",
                                                  "zero_optimization.stage=3"], world_size=2)
    lines = excinfo.value.problems
    assert len(lines) == 2, lines  # no "num_layers is not set" echo of the bad value
    assert "num_layers: expected int, got 'four'" in lines[0]
    assert "zero_optimization.stage 3 with pipe_parallel_size 2" in lines[1]


def test_precision_auto_is_bf16_only_where_the_hardware_computes_it(write_yaml, tmp_path, monkeypatch):
    from neox_llama.config import validation

    native, emulated = tmp_path / "native", tmp_path / "emulated"
    native.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    emulated.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert validation.cpu_has_native_bf16(str(native)) and not validation.cpu_has_native_bf16(str(emulated))
    assert not validation.cpu_has_native_bf16(str(tmp_path / "absent"))
    assert validation.auto_precision("cuda") == "bf16" and validation.auto_precision("cuda", False) == "fp32"
    for flags, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(validation, "cpu_has_native_bf16", lambda flags=flags: flags)
        cfg = load_config([ROOT / "configs/llama3/tiny.yml"], ["tokenizer_type=null", "vocab_file=null",
                                                              "vocab_size=256"])
        assert cfg.precision == expected  # the preset says auto; the resolved config says what runs
