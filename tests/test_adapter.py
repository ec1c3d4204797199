"""LLaMA-Adapter (v1) and Adapter v2 in-process: step 0 is the base exactly, only adapter tensors train, the gate
mixes in the prompt as PEFT's adaption_prompt does (equal logits through peft.PeftModel), and v2's scale and bias
act per output feature."""

from __future__ import annotations

import pytest
import torch
from helpers import inprocess
from helpers.adapter import adapted, adapter_checkpoint
from helpers.checkpoints import TINY, save_random_checkpoint

from neox_llama.checkpoint.run import load_model
from neox_llama.peft.adapter import AdapterSettings, is_adapter_tensor

UNTIED = {**TINY, "no_weight_tying": True, "num_layers": 3}
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 64, 100, 3], [4, 8, 15, 16, 23, 42, 2, 1, 0]])
V1 = AdapterSettings("adapter", prompt_length=4, start_layer=1)
V2 = AdapterSettings("adapter_v2", prompt_length=3, start_layer=2, gate="per_head")


def tool(name, *args):
    """``python tools/NAME ARGS``, run in this process."""
    return inprocess.tool(name, *map(str, args))


@pytest.fixture
def base(tmp_path):
    save_random_checkpoint(tmp_path / "base", UNTIED)
    return tmp_path / "base"


@pytest.mark.parametrize("settings", [V1, V2], ids=["adapter", "adapter_v2"])
def test_step_zero_is_the_base_exactly_and_only_adapter_tensors_train(base, settings):
    model, _ = load_model(base)
    with torch.no_grad():
        before = model(IDS)
    model, run = adapted(base, settings)
    with torch.no_grad():
        assert torch.equal(model(IDS), before)  # gates start at zero, scales at one, biases at zero
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    prompts = [n for n in trainable if n.endswith("adapter.prompt")]
    assert prompts == [f"{i}.attention.adapter.prompt" for i in range(settings.start_layer + 1, run.args.num_layers + 1)]
    if settings.v2:
        assert "2.attention.query.adapter.scale" in trainable and "1.mlp.down.adapter.bias" in trainable
        assert "5.head.adapter.scale" in trainable and "5.head.adapter.bias" not in trainable  # HF's head has no bias
        assert "1.input_norm.weight" in trainable and "4.norm.weight" in trainable  # norms train in v2
        assert "0.word_embeddings.weight" not in trainable and "1.attention.query.weight" not in trainable
    else:
        assert all(".adapter." in n for n in trainable)
    for name, param in model.named_parameters():
        rest = name.split(".", 1)[1]
        assert param.requires_grad == is_adapter_tensor(rest, settings), name


def test_the_gate_mixes_the_prompt_in_and_gradients_reach_only_adapters(base):
    model, _ = adapted(base, V1)
    with torch.no_grad():
        before = model(IDS)
        model.get_submodule("3.attention.adapter").gate.fill_(0.5)
        after = model(IDS)
    assert (after - before).abs().max() > 1e-3
    model.train()
    loss = model(IDS).float().logsumexp(-1).mean()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "2.attention.adapter.gate" in grads and "3.attention.adapter.prompt" in grads
    assert all(".adapter." in n for n in grads)


def test_v2_scale_and_bias_act_per_output_feature(base):
    model, _ = adapted(base, V2)
    query = model.get_submodule("1.attention.query")
    x = torch.randn(2, 5, query.in_features)
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, query.weight)
        query.adapter.scale.copy_(torch.linspace(0.5, 1.5, query.out_features))
        query.adapter.bias.copy_(torch.linspace(-1, 1, query.out_features))
        expected = query.adapter.scale * (plain + query.adapter.bias)
        assert torch.allclose(query(x), expected, atol=1e-6)


def test_the_peft_export_of_an_adapter_gives_our_logits_through_peft(base, tmp_path):
    import json

    import peft  # a pinned requirement: fail, never skip, without it
    from transformers import AutoModelForCausalLM

    settings = AdapterSettings("adapter", prompt_length=5, start_layer=1)
    folder, _ = adapter_checkpoint(tmp_path / "v1", base, settings, seed=4)  # random prompts and open gates
    with torch.no_grad():
        ours = load_model(folder)[0](IDS)
    assert tool("convert_to_hf.py", "--checkpoint", base, "--output", tmp_path / "hf", "--dtype", "fp32").returncode == 0
    proc = tool("convert_to_hf.py", "--checkpoint", folder, "--output", tmp_path / "peft", "--peft")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", 5, 2)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(IDS).logits
        assert (theirs - ours[..., : theirs.shape[-1]]).abs().max().item() <= 1e-5
        assert (ours - load_model(base)[0](IDS)).abs().max().item() > 1e-3  # the prompts do act
    for bad, reason in ((V2, "PEFT has no Adapter v2"), (AdapterSettings("adapter", 2, 0, "per_head"), "per attention head")):
        other, _ = adapter_checkpoint(tmp_path / bad.method / bad.gate, base, bad, seed=1)
        proc = tool("convert_to_hf.py", "--checkpoint", other, "--output", tmp_path / "x", "--peft")
        assert proc.returncode == 2 and "cannot be exported to PEFT" in proc.stderr and reason in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("settings", [V1, V2], ids=["adapter", "adapter_v2"])
def test_an_adapter_checkpoint_loads_as_base_plus_attached_adapter(base, tmp_path, settings):
    from neox_llama.checkpoint.run import load_run

    folder, saved = adapter_checkpoint(tmp_path / "ad", base, settings, seed=2)
    model, _ = adapted(base, settings)
    with torch.no_grad():
        for name, tensor in saved.items():
            dict(model.named_parameters())[name].copy_(tensor)
        expected = model(IDS)
    alone, run = load_model(folder)  # the checkpoint alone finds its base
    assert run.folder == base.resolve() and len(run.adapters) == 1
    with torch.no_grad():
        assert torch.equal(alone(IDS), expected)
        assert torch.equal(load_model(load_run(base, adapters=[folder]))[0](IDS), expected)  # --adapter
        assert (expected - load_model(base)[0](IDS)).abs().max() > 1e-3  # the adapter does change the model


def test_adapter_checkpoints_refuse_what_cannot_be_done(base, tmp_path):
    from neox_llama.checkpoint.merge import Adapter, merge_to_checkpoint
    from neox_llama.checkpoint.paths import CheckpointError
    from neox_llama.checkpoint.run import load_run

    one, _ = adapter_checkpoint(tmp_path / "a", base, V1, seed=2)
    two, _ = adapter_checkpoint(tmp_path / "b", base, V2, seed=3)
    with pytest.raises(CheckpointError, match="an Adapter checkpoint applies alone"):
        load_model(load_run(base, adapters=[one, two]))
    with pytest.raises(CheckpointError, match="is a learned prompt and its gates, which cannot be folded"):
        merge_to_checkpoint([Adapter.open(one)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_v2_partial_merge_equals_the_adapted_model_with_closed_gates_and_exports_to_hf(base, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    folder, saved = adapter_checkpoint(tmp_path / "v2", base, V2, seed=5)
    for index in {name.split(".")[0] for name in saved if name.endswith("adapter.gate")}:  # close every gate
        from neox_llama.checkpoint.adapter import adapter_file
        from neox_llama.checkpoint.weights import read_layer_file, write_layer_file

        path = adapter_file(folder, int(index))
        tensors = read_layer_file(path)
        tensors["attention.adapter.gate"] = torch.zeros_like(tensors["attention.adapter.gate"])
        write_layer_file(path, tensors)
    with torch.no_grad():
        expected = load_model(folder)[0](IDS)

    proc = tool("merge_lora.py", "--checkpoint", folder, "--output", tmp_path / "m")
    assert proc.returncode == 2 and "--partial merges its scales, biases and norms" in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists()
    proc = tool("merge_lora.py", "--checkpoint", folder, "--output", tmp_path / "m", "--partial")
    assert proc.returncode == 0, proc.stderr
    merged, run = load_model(tmp_path / "m")
    assert run.args.use_bias_in_attn_linear and run.args.use_bias_in_mlp and not run.metadata.is_adapter
    with torch.no_grad():
        assert (merged(IDS) - expected).abs().max().item() <= 1e-5
        assert (expected - load_model(base)[0](IDS)).abs().max().item() > 1e-3  # scales, biases, norms do act
    proc = tool("convert_to_hf.py", "--checkpoint", tmp_path / "m", "--output", tmp_path / "hf", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(IDS).logits
    assert (theirs - expected[..., : theirs.shape[-1]]).abs().max().item() <= 1e-5
    v1, _ = adapter_checkpoint(tmp_path / "v1", base, V1, seed=6)
    proc = tool("merge_lora.py", "--checkpoint", v1, "--output", tmp_path / "m1", "--partial")
    assert proc.returncode == 2 and "is a learned prompt and its gates" in proc.stderr and "Traceback" not in proc.stderr


def test_one_batch_serves_lora_adapter_and_adapter_v2_rows_each_as_alone(base, tmp_path):
    from helpers.lora import adapter_checkpoint as lora_checkpoint

    from neox_llama.generation.adapter_bank import AdapterBank
    from neox_llama.generation.language_model import LanguageModel
    from neox_llama.generation.settings import GenerationSettings
    from neox_llama.peft.lora import LoraSettings

    lora_checkpoint(tmp_path / "lora", base, LoraSettings(3, 7.0, 0.0, ("query", "value")), seed=1)
    v1, _ = adapter_checkpoint(tmp_path / "v1", base, AdapterSettings("adapter", 6, 0, "per_head"), seed=2)
    v2, _ = adapter_checkpoint(tmp_path / "v2", base, V2, seed=3)  # 3 prompt tokens from block 2
    prompts = [[1, 5, 9, 20], [1, 33, 7], [1, 64, 100, 3, 8, 2], [1, 12], [1, 2, 3]]
    which = [2, 0, 3, 1, 3]
    lm = LanguageModel.from_checkpoint(str(base), device="cpu")
    AdapterBank.attach(lm, {"lora": str(tmp_path / "lora"), "v1": str(v1), "v2": str(v2)})
    batched = lm.generate(prompts, [GenerationSettings(max_new_tokens=8) for _ in prompts], adapters=which)
    alone = {0: LanguageModel.from_checkpoint(str(base), device="cpu")}
    for k, folder in enumerate((tmp_path / "lora", v1, v2), start=1):
        alone[k] = LanguageModel.from_checkpoint(str(folder), device="cpu")
    for prompt, k, got in zip(prompts, which, batched, strict=True):
        assert got == alone[k].generate([prompt], [GenerationSettings(max_new_tokens=8)])[0], k
    assert len({tuple(o) for o in batched[:4]}) == 4  # each adapter really changes the output
    ids = torch.tensor([prompts[2], prompts[2]])
    lm.bank.select(torch.tensor([3, 2]))
    with torch.no_grad():
        per_row = lm.model(ids)
        lm.bank.select(None)
        torch.testing.assert_close(per_row[0], alone[3].model(ids[:1])[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(per_row[1], alone[2].model(ids[:1])[0], rtol=1e-4, atol=1e-5)
