"""PEFT LoRA in (convert_from_hf.py --peft): what our LoRA checkpoints cannot represent is refused, naming the
field or tensor, and nothing is written at --output (the adapter folder and the base are untouched)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from helpers.bad_inputs import tool, tree_hash


def _adapter(world, tmp_path, **config) -> Path:
    """A PEFT LoRA (q_proj, v_proj) made by peft on the world's HF export, its adapter_config.json then edited."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["w"] / "hf", dtype=torch.float32)
    out = tmp_path / "peft"
    peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


def _edit_tensors(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _import(world, tmp_path, adapter: Path):
    base = world["w"] / "run/ck"
    hashes = [(adapter, tree_hash(adapter)), (base, tree_hash(base))]
    proc = tool("convert_from_hf.py", "--peft", adapter, "--base", base, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return proc, hashes


def case_peft_in_dora(world, tmp_path):
    proc, hashes = _import(world, tmp_path, _adapter(world, tmp_path, use_dora=True))
    return proc, "adapter_config.json: use_dora: a DoRA adapter", hashes


def case_peft_in_modules_to_save(world, tmp_path):
    proc, hashes = _import(world, tmp_path, _adapter(world, tmp_path, modules_to_save=["lm_head"]))
    return proc, "adapter_config.json: modules_to_save: fully trained copies of ['lm_head']", hashes


def case_peft_in_bias(world, tmp_path):
    proc, hashes = _import(world, tmp_path, _adapter(world, tmp_path, bias="lora_only"))
    return proc, "adapter_config.json: bias: 'lora_only' trains biases", hashes


def case_peft_in_unknown_target(world, tmp_path):
    proc, hashes = _import(world, tmp_path, _adapter(world, tmp_path, target_modules=["q_proj", "rotary_emb"]))
    return proc, "adapter_config.json: target_modules: 'rotary_emb' is not one of our linear layers", hashes


def case_peft_in_unknown_module_tensor(world, tmp_path):
    adapter = _adapter(world, tmp_path)
    _edit_tensors(adapter, lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight":
            t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")}))
    proc, hashes = _import(world, tmp_path, adapter)
    return proc, "model.layers.0.self_attn.rotary is not one of our linear layers", hashes


def case_peft_in_shape_mismatch(world, tmp_path):
    adapter = _adapter(world, tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    _edit_tensors(adapter, lambda t: t.update({key: torch.zeros(2, t[key].shape[1] + 8)}))
    proc, hashes = _import(world, tmp_path, adapter)
    return proc, "model.layers.1.self_attn.v_proj: lora_A (2, ", hashes


def case_peft_in_lora_bias(world, tmp_path):
    proc, hashes = _import(world, tmp_path, _adapter(world, tmp_path, lora_bias=True))
    return proc, "adapter_config.json: lora_bias: a bias on lora_B", hashes


def case_peft_in_fan_in_fan_out(world, tmp_path):
    proc, hashes = _import(world, tmp_path, _adapter(world, tmp_path, fan_in_fan_out=True))
    return proc, "adapter_config.json: fan_in_fan_out: transposed (Conv1D-style) weights", hashes
