"""LoRA in-process: step 0 is the base, merges (any step, weighted) equal the unmerged adapter, the base is
checked by fingerprint and shape, and the PEFT export loads in peft with our logits."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml
from helpers import inprocess
from helpers.checkpoints import save_random_checkpoint
from helpers.lora import IDS, SETTINGS, UNTIED, adapter_checkpoint, unmerged_logits
from helpers.runner import ROOT, run

from neox_llama.checkpoint.adapter import adapter_file
from neox_llama.checkpoint.merge import Adapter, merge_to_checkpoint
from neox_llama.checkpoint.paths import CheckpointError
from neox_llama.checkpoint.run import load_model, load_run
from neox_llama.checkpoint.weights import read_layer_file
from neox_llama.model.factory import SINGLE_DEVICE
from neox_llama.peft.lora import LoraSettings, apply_lora


@pytest.fixture
def base(tmp_path):
    save_random_checkpoint(tmp_path / "base", UNTIED)
    return tmp_path / "base"


def test_step_zero_is_the_base_exactly(base):
    model, _ = load_model(base)
    with torch.no_grad():
        before = model(IDS)
    layers = {int(i): m for i, m in model.named_children()}
    assert apply_lora(layers, LoraSettings(8, 16.0, 0.1, ("query", "key", "value", "output", "mlp", "head")),
                      SINGLE_DEVICE, 5) == 2 * 7 + 1  # q, k, v, o, gate, up, down per block; the head
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora." in n)
    with torch.no_grad():
        assert torch.equal(model.eval()(IDS), before)  # B starts at zero


def test_a_lora_checkpoint_loads_as_base_plus_adapter_and_merges_to_the_same_logits(base, tmp_path):
    adapter = adapter_checkpoint(tmp_path / "lora" / "global_step4", base, SETTINGS, seed=1, step=4)
    expected = unmerged_logits(base, adapter, SETTINGS)
    model, run = load_model(adapter)  # the base found through the adapter's metadata
    assert run.folder == base.resolve() and run.prompt_style == "alpaca"
    with torch.no_grad():
        merged_in_memory = model(IDS)
    assert (merged_in_memory - expected).abs().max().item() <= 1e-5
    assert (merged_in_memory - load_model(base)[0](IDS)).abs().max().item() > 1e-3  # the adapter changes the model
    out = merge_to_checkpoint([Adapter.open(adapter)], tmp_path / "merged")
    merged, merged_run = load_model(out)
    with torch.no_grad():
        assert torch.equal(merged(IDS), merged_in_memory)  # the file merge and the load-time merge are one rule
    assert merged_run.metadata.merged_from[0]["step"] == 4 and merged_run.prompt_style == "alpaca"
    assert not merged_run.adapters and "lora_r" not in yaml.safe_load((out / "config.yml").read_text())


def test_weighted_merge_equals_the_hand_computed_combination(base, tmp_path):
    other = LoraSettings(r=2, alpha=3.0, dropout=0.0, targets=("key", "value"))
    a = adapter_checkpoint(tmp_path / "a", base, SETTINGS, seed=1)
    b = adapter_checkpoint(tmp_path / "b", base, other, seed=2)
    out = merge_to_checkpoint([Adapter.open(a, 0.7), Adapter.open(b, 0.3)], tmp_path / "blend")
    for index, name in ((1, "attention.key.weight"), (2, "attention.value.weight"), (2, "mlp.up.weight"),
                        (4, "head.weight"), (1, "input_norm.weight")):
        w = read_layer_file(base / "weights" / f"layer_{index:03d}.safetensors")[name]
        expected = w.clone()
        path = name.removesuffix(".weight")
        for folder, settings, weight in ((a, SETTINGS, 0.7), (b, other, 0.3)):
            file = adapter_file(folder, index)
            tensors = read_layer_file(file) if file.exists() else {}
            if f"{path}.lora.a" in tensors:
                expected += weight * settings.scaling * tensors[f"{path}.lora.b"] @ tensors[f"{path}.lora.a"]
        got = read_layer_file(out / "weights" / f"layer_{index:03d}.safetensors")[name]
        assert torch.allclose(got, expected, atol=1e-6), name


def test_a_different_base_is_refused_unless_forced_and_shapes_always_checked(base, tmp_path):
    adapter = adapter_checkpoint(tmp_path / "lora", base, SETTINGS, seed=1)
    save_random_checkpoint(tmp_path / "other", UNTIED, seed=77)  # same shapes, other weights
    with pytest.raises(CheckpointError, match=r"fingerprint .* differs"):
        merge_to_checkpoint([Adapter.open(adapter)], tmp_path / "m1", base=tmp_path / "other")
    assert not (tmp_path / "m1").exists()
    merge_to_checkpoint([Adapter.open(adapter)], tmp_path / "m2", base=tmp_path / "other", force=True)
    save_random_checkpoint(tmp_path / "wide", {**UNTIED, "intermediate_size": 128})
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)\.weight has shape"):
        merge_to_checkpoint([Adapter.open(adapter)], tmp_path / "m3", base=tmp_path / "wide", force=True)
    assert not (tmp_path / "m3").exists() and not list(tmp_path.glob(".m3.*"))  # nothing half-written is left
    shutil.move(base, tmp_path / "moved")
    with pytest.raises(CheckpointError, match="take its new place with --base"):
        load_run(adapter)
    assert load_run(adapter, base=tmp_path / "moved").folder == (tmp_path / "moved").resolve()


def tool(name, *args):
    """``python tools/NAME ARGS`` from the repository root, run in this process."""
    return inprocess.tool(name, *args, cwd=ROOT)


def test_merge_lora_command_line(base, tmp_path):
    adapter = adapter_checkpoint(tmp_path / "lora", base, SETTINGS, seed=1)
    # a real process: the tool's script path itself
    proc = run([sys.executable, str(ROOT / "tools" / "merge_lora.py"), "--checkpoint", str(adapter), "--output",
                str(tmp_path / "out")])
    assert proc.returncode == 0 and f"wrote {tmp_path / 'out'}" in proc.stdout, proc.stderr
    for args, message in (
        (["--checkpoint", str(base), "--output", str(tmp_path / "x")], "not an adapter checkpoint"),
        (["--checkpoint", str(adapter), "--output", str(tmp_path / "out")], "exists and is not empty"),
        (["--checkpoint", str(adapter), "--checkpoint", str(adapter), "--weight", "1", "--output", str(tmp_path / "y")],
         "2 --checkpoint but 1 --weight"),
    ):
        proc = tool("merge_lora.py", *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_peft_loads_the_export_with_our_logits(base, tmp_path):
    import peft  # a pinned requirement: fail, never skip, without it
    from transformers import AutoModelForCausalLM

    adapter = adapter_checkpoint(tmp_path / "lora", base, SETTINGS, seed=3)
    assert tool("convert_to_hf.py", "--checkpoint", str(base), "--output", str(tmp_path / "hf"),
                "--dtype", "fp32").returncode == 0
    proc = tool("convert_to_hf.py", "--checkpoint", str(adapter), "--output", str(tmp_path / "peft"), "--peft")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (3, 7.0)
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "up_proj"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(IDS).logits
    ours = unmerged_logits(base, adapter, SETTINGS)[..., : theirs.shape[-1]]
    assert (theirs - ours).abs().max().item() <= 1e-5
    # the plain export of a LoRA checkpoint is its base with the adapter merged
    assert tool("convert_to_hf.py", "--checkpoint", str(adapter), "--output", str(tmp_path / "hfm"),
                "--dtype", "fp32").returncode == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hfm", dtype=torch.float32)(IDS).logits
    assert (merged - ours).abs().max().item() <= 1e-5
    proc = tool("convert_to_hf.py", "--checkpoint", str(base), "--output", str(tmp_path / "p2"), "--peft")
    assert proc.returncode == 2 and "this is a full checkpoint" in proc.stderr


def plan(tmp_path, *overrides):
    from neox_llama.config import load_config
    from neox_llama.training.load_plan import plan_load

    cfg = load_config([ROOT / "configs/llama3/tiny.yml"], ["tokenizer_type=null", "vocab_file=null", "vocab_size=128",
                                                          *overrides])
    return plan_load(cfg)


def test_the_load_plan_resumes_a_fine_tune_in_save_and_protects_the_base(base, tmp_path):
    from neox_llama.errors import TrainingError

    lora = ["finetune=true", f"load={base}", "lora_r=3", "lora_alpha=7", "lora_targets=[head,mlp,output,key]"]
    fresh = plan(tmp_path, *lora, f"save={tmp_path / 'runs'}")
    assert fresh.resume is None and fresh.weights == base and fresh.base.path == str(base.resolve())
    adapter = adapter_checkpoint(tmp_path / "runs" / "global_step6", base, SETTINGS, seed=1)
    (tmp_path / "runs" / "latest").write_text("global_step6")
    again = plan(tmp_path, *lora, f"save={tmp_path / 'runs'}")  # targets in another order: the same adapter
    assert (again.resume, again.adapters, again.weights) == (adapter, adapter, base) and again.notes
    with pytest.raises(TrainingError, match="the config says"):
        plan(tmp_path, *lora, "lora_r=4", f"save={tmp_path / 'runs'}")
    with pytest.raises(TrainingError, match="is the directory of the checkpoint being fine-tuned"):
        plan(tmp_path, *lora, f"save={base.parent}")
    (tmp_path / "runs" / "latest").write_text("global_step8")  # names a folder that is not complete
    with pytest.raises(TrainingError, match=r"save: .*global_step8 is not a complete checkpoint"):
        plan(tmp_path, *lora, f"save={tmp_path / 'runs'}")
    resumed = plan(tmp_path, "finetune=false", f"load={adapter}", *lora[2:], "lora_dropout=0.2")
    assert resumed.resume == adapter and resumed.weights == base.resolve()


def test_freeze_head_freezes_the_embedding_only_when_tied():
    from neox_llama.config.freeze import FreezeError, is_frozen, parse_freeze

    rules = parse_freeze(["head"], 4)
    assert not is_frozen(rules, 0, "word_embeddings.weight", 4, tied=False)
    assert is_frozen(rules, 0, "word_embeddings.weight", 4, tied=True)
    assert is_frozen(rules, 6, "head.weight", 4)
    rules = parse_freeze(["layers.1-2.mlp", "norms"], 4)
    assert is_frozen(rules, 2, "mlp.up.weight", 4) and is_frozen(rules, 3, "mlp.down.weight", 4)
    assert not is_frozen(rules, 2, "attention.query.weight", 4) and not is_frozen(rules, 4, "mlp.up.weight", 4)
    assert is_frozen(rules, 1, "input_norm.weight", 4) and is_frozen(rules, 5, "norm.weight", 4)
    for bad in ("layer.1", "layers.3-1", "layers.0.ffn", "embedding"):
        with pytest.raises(FreezeError, match="freeze entry"):
            parse_freeze([bad], 4)


def test_a_gate_only_lora_adapts_mlp_gate_alone_and_exports_as_gate_proj(base, tmp_path):
    model, _ = load_model(base)
    layers = {int(i): m for i, m in model.named_children()}
    assert apply_lora(layers, LoraSettings(2, 4.0, 0.0, ("gate",)), SINGLE_DEVICE, 0) == 2
    adapted = sorted({n.split(".lora.")[0] for n, _ in model.named_parameters() if ".lora." in n})
    assert adapted == ["1.mlp.gate", "2.mlp.gate"]
    settings = LoraSettings(2, 4.0, 0.0, ("gate", "down"))
    adapter = adapter_checkpoint(tmp_path / "lora", base, settings, seed=4)
    proc = tool("convert_to_hf.py", "--checkpoint", str(adapter), "--output", str(tmp_path / "peft"), "--peft")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj"]
