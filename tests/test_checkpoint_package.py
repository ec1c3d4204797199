"""neox_llama.checkpoint: no DeepSpeed, one metadata writer, shape-checked loading, damaged files named."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest
import torch
import yaml
from helpers.checkpoints import TINY, save_random_checkpoint

import neox_llama
from neox_llama.checkpoint.metadata import Layout, Metadata, read_metadata, write_metadata
from neox_llama.checkpoint.paths import CheckpointError, layer_file, resolve_checkpoint
from neox_llama.checkpoint.run import load_model, load_run

DEEPSPEED_FREE = ("neox_llama.checkpoint", "neox_llama.generation", "neox_llama.convert", "neox_llama.config",
                  "neox_llama.model", "neox_llama.data", "neox_llama.tokenizers", "neox_llama.evaluation",
                  "neox_llama.serving", "neox_llama.peft", "neox_llama.planning")

def test_checkpoint_generation_convert_and_config_import_no_deepspeed():
    modules = []
    for package in DEEPSPEED_FREE:
        path = neox_llama.__path__[0] + "/" + package.split(".", 1)[1]
        modules += [package] + [f"{package}.{m.name}" for m in pkgutil.walk_packages([path])]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.'))\n"
            "print(len(sys.modules)); sys.exit('imported DeepSpeed: ' + ', '.join(bad[:5]) if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout
    assert len(modules) > 20  # the walk found the submodules, not just the empty __init__ files


def test_importing_the_package_has_no_side_effects():
    code = "import os, sys; os.environ.pop('DS_ACCELERATOR', None); import neox_llama; " \
           "sys.exit(('torch' in sys.modules) or ('DS_ACCELERATOR' in os.environ))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "DS_ACCELERATOR"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_metadata_round_trip_and_bad_files(tmp_path):
    meta = Metadata(tag="global_step3", step=3, consumed_samples=24, consumed_valid_samples=8, best_valid_loss=1.5,
                    layout=Layout(2, 1, 2, 1, 4), tokenizer_files=["tok.model"], precision="bf16")
    write_metadata(tmp_path, meta)
    assert read_metadata(tmp_path) == meta
    (tmp_path / "metadata.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match=r"format 99, expected 1"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"metadata.json: unreadable"):
        read_metadata(tmp_path)


def test_resolve_latest_step_and_best(tmp_path):
    for tag in ("global_step2", "best"):
        write_metadata(tmp_path / tag, Metadata(tag=tag))
    (tmp_path / "latest").write_text("global_step2")
    assert resolve_checkpoint(tmp_path) == tmp_path / "global_step2"
    assert resolve_checkpoint(tmp_path / "best") == tmp_path / "best"
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match=r"names global_step9, but .* is not a complete checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint directory not found"):
        resolve_checkpoint(tmp_path / "nope")


def test_load_model_equals_the_saved_model(tmp_path):
    saved = save_random_checkpoint(tmp_path / "global_step7").eval()
    model, run = load_model(tmp_path / "global_step7")
    assert run.metadata.step == 7 and run.args.num_kv_heads == 2 and run.true_vocab == 128
    assert not any(p.is_meta for p in model.parameters())
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), saved(ids))  # rotary tables rebuilt after the meta-device build


def test_load_model_names_the_tensor_and_both_shapes(tmp_path):
    save_random_checkpoint(tmp_path / "ck")
    wider = {**TINY, "intermediate_size": 128}
    (tmp_path / "ck" / "config.yml").write_text(yaml.safe_dump(wider))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ck")
    message = str(err.value)
    assert "layer_001.safetensors" in message and "mlp." in message and "(96, 64)" in message and "(128, 64)" in message


def test_load_model_refuses_missing_and_leftover_tensors(tmp_path):
    save_random_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.yml").write_text(yaml.safe_dump({**TINY, "use_bias_in_mlp": True}))
    with pytest.raises(CheckpointError, match=r"no tensor for mlp.down.bias"):
        load_model(tmp_path / "ck")
    save_random_checkpoint(tmp_path / "ck2", {**TINY, "use_bias_in_mlp": True})
    (tmp_path / "ck2" / "config.yml").write_text(yaml.safe_dump(TINY))
    with pytest.raises(CheckpointError, match=r"has no place in the model"):
        load_model(tmp_path / "ck2")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_weight_file_is_named(tmp_path, damage):
    save_random_checkpoint(tmp_path / "ck")
    path = layer_file(tmp_path / "ck", 2)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=r"layer_002.safetensors"):
        load_model(tmp_path / "ck")


def test_load_run_reports_a_bad_config_as_a_checkpoint_error(tmp_path):
    save_random_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.yml").write_text("hidden_size: [\n")
    with pytest.raises(CheckpointError, match=r"config.yml"):
        load_run(tmp_path / "ck")


def test_a_one_rank_zero_1_checkpoint_from_before_stage_0_resumes_at_its_stage(write_yaml, tmp_path):
    """One fp32 rank at ZeRO 1 runs stage 0 now; a checkpoint such a run saved at stage 1 (before) keeps stage 1
    for its resume, so that DeepSpeed loads its optimizer state as it is. The load plan decides the stage the engine
    is built with; the validated config is left as it is."""
    from neox_llama.checkpoint.metadata import Layout, Metadata, write_metadata
    from neox_llama.config import deepspeed_config, load_config, zero_text
    from neox_llama.training.load_plan import plan_load, resume_zero_stage, same_layout

    tiny = ("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nintermediate_size: 192\nseq_length: 32\n"
            "vocab_size: 256\nprecision: fp32\n")

    def cfg(*overrides):
        return load_config([write_yaml("a.yml", tiny)], ["zero_optimization.stage=1", *overrides])

    old = Metadata(tag="global_step4", step=4, layout=Layout(1, 1, 1, zero_stage=1, world_size=1))
    folder = tmp_path / "run" / "global_step4"
    folder.mkdir(parents=True)
    write_metadata(folder, old)
    now = cfg(f"load={folder}")
    plan = plan_load(now)
    assert now.derived.engine_zero_stage == 0 and not same_layout(old, now, 0)  # the config stays as validated
    assert plan.resume == folder and plan.zero_stage == 1 and plan.same_layout and plan.weights is None
    assert plan.notes == [f"{folder} was saved by DeepSpeed at ZeRO stage 1: this run keeps that stage, so that its "
                          "optimizer state loads as it is"]
    assert deepspeed_config(now, zero_stage=plan.zero_stage)["zero_optimization"]["stage"] == 1
    assert deepspeed_config(now)["zero_optimization"]["stage"] == 0 and zero_text(now, runs=plan.zero_stage) == "1"
    new = Metadata(tag="global_step4", step=4, layout=Layout(1, 1, 1, zero_stage=0, world_size=1))  # saved since: nothing to keep
    assert resume_zero_stage(new, cfg()) == 0 and same_layout(new, cfg(), 0)
    another = cfg("zero_optimization.stage=2", f"load={folder}")  # another stage asked: weights only
    assert resume_zero_stage(old, another) == 0
    plan = plan_load(another)
    assert plan.zero_stage == 0 and not plan.same_layout and plan.weights == folder and not plan.notes
