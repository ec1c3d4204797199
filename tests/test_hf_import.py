"""Hugging Face -> neox_llama -> Hugging Face is tensor-for-tensor identical; bad HF directories fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers  # a pinned requirement: fail, never skip, without it
from helpers import inprocess
from helpers.launches import Case, completed, register
from helpers.runner import ROOT
from helpers.training import deepy_args, write_corpus
from safetensors.torch import load_file, save_file

SHAPES = {
    "mha": {"num_key_value_heads": 4},
    "gqa": {"num_key_value_heads": 2, "rope_theta": 500000.0},
    "tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "rope-scaling": {"num_key_value_heads": 2, "max_position_embeddings": 256,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}},
}


def hf_model(path, **overrides):
    settings = {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": 128, **overrides}
    config = transformers.LlamaConfig(**settings)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


def run(tool, *args):
    """``python tools/TOOL ARGS``, run in this process."""
    return inprocess.tool(tool, *args)


def process(tool, *args):
    """``python tools/TOOL ARGS`` in a process of its own."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", [(1, 1), (2, 2)], ids=["pp1", "pp2tp2"])
def test_round_trip_is_identical(tmp_path, shape, layout):
    from neox_llama.convert.hf_export import export_to_hf
    from neox_llama.convert.hf_import import import_from_hf

    hf_model(tmp_path / "hf", **SHAPES[shape])
    if (shape, layout) == ("gqa", (2, 2)):  # once through the command lines, as a user would
        proc = run("convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"),
                   "--pipe-parallel-size", "2", "--model-parallel-size", "2")
        assert proc.returncode == 0, proc.stderr
        proc = run("convert_to_hf.py", "--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "back"),
                   "--dtype", "fp32")
        assert proc.returncode == 0, proc.stderr
    else:
        import_from_hf(tmp_path / "hf", tmp_path / "ours", *layout)
        export_to_hf(tmp_path / "ours", tmp_path / "back", "fp32")
    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    before = {k: v for k, v in before.items() if not (SHAPES[shape].get("tie_word_embeddings") and k == "lm_head.weight")}
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert reloaded.config.num_key_value_heads == SHAPES[shape]["num_key_value_heads"]
    written = json.loads((tmp_path / "back" / "config.json").read_text())  # transformers 4 reads these keys
    assert written["rope_theta"] == SHAPES[shape].get("rope_theta", written["rope_parameters"]["rope_theta"])
    assert ("rope_scaling" in written) == (shape == "rope-scaling")


def test_import_writes_a_model_config_for_fine_tuning(tmp_path):
    hf_model(tmp_path / "hf", num_key_value_heads=2)
    # a real process: the tool's script path itself
    assert process("convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"),
                   "--model-parallel-size", "2").returncode == 0
    text = (tmp_path / "ours" / "model.yml").read_text()
    assert "finetune: true" in text and "model_parallel_size: 2" in text and "intermediate_size: 160" in text
    assert (tmp_path / "ours" / "latest").read_text() == "global_step0"


def test_bad_hf_directories_fail_clearly_and_write_nothing(tmp_path):
    hf_model(tmp_path / "hf", num_key_value_heads=2)
    out = tmp_path / "out"
    proc = run("convert_from_hf.py", "--hf", str(tmp_path / "nothing"), "--output", str(out))
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc = run("convert_from_hf.py", "--hf", str(gpt), "--output", str(out))
    assert proc.returncode == 2 and "model_type 'gpt2' is not a Llama model" in proc.stderr
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "hf" / "model.safetensors"))
    proc = run("convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(out))
    assert proc.returncode == 2 and "tensor model.layers.1.mlp.up_proj.weight is missing" in proc.stderr
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    proc = run("convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(out))
    assert proc.returncode == 2 and "k_proj.weight has shape (64, 64), but config.json implies (32, 64)" in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    proc = run("convert_from_hf.py", "--hf", str(tmp_path / "gpt"), "--output", str(taken))
    assert proc.returncode == 2


def fine_tune_args(folder):
    """Into ``folder`` (the case's): the HF model, its import as a 2-stage pipeline (the import's exit status in
    import.json) and a corpus; deepy.py's arguments fine-tuning the import into folder/ft."""
    hf_model(folder / "hf", num_key_value_heads=2, rope_theta=500000.0)
    imported = run("convert_from_hf.py", "--hf", str(folder / "hf"), "--output", str(folder / "ours"),
                   "--pipe-parallel-size", "2")
    (folder / "import.json").write_text(json.dumps({"returncode": imported.returncode, "stderr": imported.stderr}))
    corpus = write_corpus(folder / "chain", docs=80)
    return deepy_args(folder / "ft", corpus, "train_iters=1", "optimizer.params.lr=0", "min_lr=0", "eval_iters=0",
                      "vocab_size=384", "make_vocab_size_divisible_by=1", f"load={folder / 'ours'}",
                      preset=str(folder / "ours" / "model.yml"))


register(Case("hf-import-fine-tune", 2, "train", fine_tune_args))  # a case of the shared 2-rank launch


@pytest.mark.dist
@pytest.mark.uses_cases("hf-import-fine-tune")
def test_fine_tuning_starts_from_the_imported_weights(launched):
    from helpers.training import records

    folder = launched("hf-import-fine-tune").folder
    imported = json.loads((folder / "import.json").read_text())
    assert imported["returncode"] == 0, imported["stderr"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf")  # the model that was imported
    proc = completed(launched("hf-import-fine-tune"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fine-tuning from the weights of" in proc.stderr and "pp 2 x tp 1 x dp 1" in proc.stderr
    # the first step's loss is the imported model's own loss on that batch
    from neox_llama.config import load_config
    from neox_llama.data.loader import build_datasets

    cfg = load_config([folder / "ft" / "logs" / "config.yml"], world_size=2, apply_presets=False)
    train = build_datasets(cfg)["train"]
    batch = torch.stack([torch.from_numpy(train[i]) for i in range(cfg.derived.train_batch_size)])
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    assert abs(records(folder / "ft")[0]["loss"] - expected) <= 1e-5  # fp32 (the test helper's precision)
