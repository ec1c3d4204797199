"""PEFT LoRA in (tools/convert_from_hf.py --peft): an adapter made with the real peft library on our HF export comes
in with PEFT's logits (plain, rank_pattern/alpha_pattern, use_rslora), and ours -> PEFT -> ours is exact."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import inprocess
from helpers.checkpoints import save_random_checkpoint
from helpers.lora import IDS, SETTINGS, UNTIED, adapter_checkpoint
from helpers.runner import ROOT

from neox_llama.checkpoint.adapter import adapter_layers
from neox_llama.checkpoint.metadata import read_metadata
from neox_llama.checkpoint.run import load_model


def tool(name, *args):
    return inprocess.tool(name, *args, cwd=ROOT)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random untied base and its fp32 HF export."""
    w = tmp_path_factory.mktemp("peft_in")
    save_random_checkpoint(w / "base", UNTIED)
    proc = tool("convert_to_hf.py", "--checkpoint", str(w / "base"), "--output", str(w / "hf"), "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    return w


def peft_adapter(hf_dir, out, seed, **lora):
    """A PEFT LoRA on the export with random non-zero A and B, saved by peft itself."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    wrapped.save_pretrained(out)
    return out


def peft_logits(hf_dir, adapter_dir):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, adapter_dir).eval()(IDS).logits


def imported_logits(world, adapter_dir, out):
    proc = tool("convert_from_hf.py", "--peft", str(adapter_dir), "--base", str(world / "base"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    model, run = load_model(out)
    assert run.folder == (world / "base").resolve() and len(run.adapters) == 1
    with torch.no_grad():
        return model.eval()(IDS), run


CASES = {
    "plain": dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj",
                                                                         "lm_head"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                     rank_pattern={"o_proj": 6, "model.layers.1.mlp.up_proj": 2}, alpha_pattern={"k_proj": 3}),
    "rslora": dict(r=4, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "gate_proj"],
                   rank_pattern={"gate_proj": 2}),
    "one_layer": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_peft_lora_comes_in_with_peft_logits(world, tmp_path, case):
    adapter = peft_adapter(world / "hf", tmp_path / "peft", seed=len(case), **CASES[case])
    theirs = peft_logits(world / "hf", adapter)
    ours, run = imported_logits(world, adapter, tmp_path / "ours")
    ours = ours[..., : theirs.shape[-1]]
    assert (theirs - ours).abs().max().item() <= 1e-5
    base, _ = load_model(world / "base")
    with torch.no_grad():
        assert (base(IDS)[..., : theirs.shape[-1]] - theirs).abs().max().item() > 1e-3  # the adapter matters
    lora = run.adapters[0].settings
    if case == "plain":
        assert (lora.r, lora.alpha, lora.dropout) == (4, 8.0, 0.05)
        assert lora.targets == ("query", "value", "gate", "down", "head")
    if case == "patterns":
        assert lora.r == 6 and lora.targets == ("key", "output", "up")


def test_ours_to_peft_to_ours_is_exact(world, tmp_path):
    adapter = adapter_checkpoint(tmp_path / "lora", world / "base", SETTINGS, seed=3)
    assert tool("convert_to_hf.py", "--checkpoint", str(adapter), "--output", str(tmp_path / "peft"),
                "--peft").returncode == 0
    proc = tool("convert_from_hf.py", "--peft", str(tmp_path / "peft"), "--base", str(world / "base"), "--output",
                str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    before, after = adapter_layers(adapter), adapter_layers(tmp_path / "back" / "global_step0")
    assert before.keys() == after.keys()
    for index, layer in before.items():
        assert layer.keys() == after[index].keys()
        assert all(torch.equal(tensor, after[index][name]) for name, tensor in layer.items())
    lora = read_metadata(tmp_path / "back" / "global_step0").lora
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (SETTINGS.r, SETTINGS.alpha, SETTINGS.dropout)
    assert lora["targets"] == ["key", "output", "gate", "up", "down", "head"]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == SETTINGS.r


def test_the_imported_checkpoint_merges_generates_and_serves_with_peft_logits(world, tmp_path):
    """merge_lora.py's checkpoint, generate.py's --adapter load and serve.py's per-row adapter bank all give PEFT's
    logits: the import is a normal LoRA checkpoint."""
    from neox_llama.generation.adapter_bank import AdapterBank
    from neox_llama.generation.language_model import LanguageModel

    adapter = peft_adapter(world / "hf", tmp_path / "peft", seed=9, **CASES["patterns"])
    theirs = peft_logits(world / "hf", adapter)
    vocab = theirs.shape[-1]
    assert tool("convert_from_hf.py", "--peft", str(adapter), "--base", str(world / "base"), "--output",
                str(tmp_path / "ours")).returncode == 0
    proc = tool("merge_lora.py", "--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    merged, _ = load_model(tmp_path / "merged")
    generating = LanguageModel.from_checkpoint(str(world / "base"), adapters=[str(tmp_path / "ours")])
    serving = LanguageModel.from_checkpoint(str(world / "base"))
    AdapterBank.attach(serving, {"p": str(tmp_path / "ours")}).select(torch.tensor([1]))
    with torch.no_grad():
        for model in (merged, generating.model, serving.model):
            assert (model.eval()(IDS)[..., :vocab] - theirs).abs().max().item() <= 1e-5


def test_the_command_lines_take_the_imported_checkpoint_as_adapter(tmp_path):
    """evaluate.py --adapter equals evaluating the merged model; generate.py --adapter equals generating from it;
    serve.py --adapter NAME=DIR scores a prompt (echo, logprobs) as the merged model does."""
    import httpx
    from helpers.serving import running_server, served_checkpoints

    from neox_llama.generation.language_model import LanguageModel

    world = served_checkpoints(tmp_path)  # a base with a tokenizer (the module's has none)
    assert tool("convert_to_hf.py", "--checkpoint", str(world / "base"), "--output", str(world / "hf"), "--dtype",
                "fp32").returncode == 0
    adapter = peft_adapter(world / "hf", tmp_path / "peft", seed=5, **CASES["plain"])
    ours, merged = tmp_path / "ours", tmp_path / "merged"
    assert tool("convert_from_hf.py", "--peft", str(adapter), "--base", str(world / "base"), "--output",
                str(ours)).returncode == 0
    assert tool("merge_lora.py", "--checkpoint", str(ours), "--output", str(merged)).returncode == 0
    (tmp_path / "text.txt").write_text("tokens " * 40)
    losses = []
    for args in (["--checkpoint", str(world / "base"), "--adapter", str(ours)], ["--checkpoint", str(merged)]):
        proc = tool("evaluate.py", *args, "--text", str(tmp_path / "text.txt"), "--seq-length", "32", "--output",
                    str(tmp_path / "eval.json"), "--no-progress")
        assert proc.returncode == 0, proc.stderr
        losses.append(json.loads((tmp_path / "eval.json").read_text())["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    ids = [int(i) for i in IDS[0]]
    outputs = [tool("generate.py", *args, "--prompt", "x", "--max-new-tokens", "4").stdout
               for args in (["--checkpoint", str(world / "base"), "--adapter", str(ours)], ["--checkpoint", str(merged)])]
    assert outputs[0] == outputs[1] and outputs[0].startswith("x")
    want = LanguageModel.from_checkpoint(str(merged), device="cpu").token_logprobs([ids])[0].tolist()
    with running_server(world, log_name="serve_peft.log", adapters={"peft": ours}) as (url, _):
        body = {"model": "peft", "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert max(abs(a - b) for a, b in zip(got["token_logprobs"][1:], want, strict=True)) <= 1e-5


def test_lora_training_goes_on_from_the_imported_checkpoint(world, tmp_path):
    """finetune: false with the imported settings continues it: base weights, its adapter tensors, a fresh optimizer
    (the import has no DeepSpeed state, so its layout is never taken for the engine's)."""
    from neox_llama.config import load_config
    from neox_llama.training.load_plan import plan_load

    adapter = peft_adapter(world / "hf", tmp_path / "peft", seed=5, r=2, lora_alpha=4, target_modules=["q_proj"])
    assert tool("convert_from_hf.py", "--peft", str(adapter), "--base", str(world / "base"), "--output",
                str(tmp_path / "ours")).returncode == 0
    cfg = load_config([ROOT / "configs/llama3/tiny.yml"], ["tokenizer_type=null", "vocab_file=null", "vocab_size=128",
                                                          f"load={tmp_path / 'ours'}", "finetune=false", "lora_r=2",
                                                          "lora_alpha=4", "lora_targets=[query]"])
    plan = plan_load(cfg)
    assert plan.adapters == tmp_path / "ours" / "global_step0" and plan.weights == (world / "base").resolve()
    assert not plan.same_layout
