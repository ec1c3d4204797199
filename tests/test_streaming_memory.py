"""The converters and the merge stream: their peak RSS above the tool's own start-up is about one layer (or one
output shard) times a small constant, not the model. Measured from ``/proc/self/status`` in a subprocess on a model of
436 MB in float32, where reading the whole model would add at least 436 MB and one layer is 13 MB. The constant:
safetensors serialises a file in memory before writing it (two more copies of a layer or shard), and glibc keeps
some freed buffers (the launcher sets MALLOC_MMAP_THRESHOLD_ for training ranks; the tools run without it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.checkpoints import TINY, save_random_checkpoint
from helpers.lora import adapter_checkpoint
from helpers.runner import ROOT

from neox_llama.peft.lora import LoraSettings

WIDE = {**TINY, "num_layers": 32, "hidden_size": 512, "num_attention_heads": 8, "num_kv_heads": 8,
        "intermediate_size": 1408, "vocab_size": 4096, "no_weight_tying": True}
MODEL_MB = (32 * (4 * 512 * 512 + 3 * 512 * 1408) + 2 * 4096 * 512) * 4 / 1e6  # 436 MB
LAYER_MB = (4 * 512 * 512 + 3 * 512 * 1408) * 4 / 1e6  # 12.8 MB

# Imports what the tool imports, then records the resident set before and the peak after running it.
MEASURE = """
import json, re, sys, psutil, transformers, safetensors.torch
from neox_llama.cli import {module} as tool
transformers.LlamaConfig, transformers.GenerationConfig  # imported lazily by the export: not what it reads
before = psutil.Process().memory_info().rss
code = tool.main(sys.argv[1:])
# VmHWM, not getrusage: ru_maxrss keeps the peak of the (large) parent across fork + exec.
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({{"code": code, "before": before, "peak": peak}}))
"""


def measure(module: str, *argv: str) -> float:
    """MB of resident memory the tool added at its peak (exit code 0 checked)."""
    proc = subprocess.run([sys.executable, "-c", MEASURE.format(module=module), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr[-3000:]
    return (result["peak"] - result["before"]) / 1e6


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    save_random_checkpoint(root / "base", WIDE)
    adapter_checkpoint(root / "lora", root / "base", LoraSettings(4, 8.0, 0.0, ("query", "value", "mlp")), seed=3)
    return root


def test_export_import_and_merge_hold_about_one_layer(wide):
    limit = 12 * LAYER_MB  # 0.36x the model: a 32 MB shard or a few layers, plus allocator slack
    export = measure("convert_to_hf", "--checkpoint", str(wide / "base"), "--output", str(wide / "hf"),
                     "--dtype", "fp32", "--max-shard-size", "32MB")
    assert len(list((wide / "hf").glob("model-*.safetensors"))) >= 13
    imported = measure("convert_from_hf", "--hf", str(wide / "hf"), "--output", str(wide / "imported"))
    merged = measure("merge_lora", "--checkpoint", str(wide / "lora"), "--output", str(wide / "merged"))
    print(f"added peak RSS (MB): export {export:.0f}, import {imported:.0f}, merge {merged:.0f}; "
          f"model {MODEL_MB:.0f}, layer {LAYER_MB:.1f}")
    assert export < limit and imported < limit and merged < limit, (export, imported, merged)
    # The round trip kept every tensor (the import stores bf16 unless the HF dtype is float32, as here).
    for index in (1, 33):
        from safetensors.torch import load_file

        name = f"weights/layer_{index:03d}.safetensors"
        ours, back = load_file(str(wide / "base" / name)), load_file(str(wide / "imported" / "global_step0" / name))
        assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)


LOAD = """
import json, re, sys, psutil
from neox_llama.checkpoint.run import load_run
from neox_llama.checkpoint.weights import fill_layers, layers_with_weights
from neox_llama.model.llama import build_model
run = load_run(sys.argv[1])
model = build_model(run.args, device="meta", initialize=False).to_empty(device="cpu")  # untouched until filled
own = sum(p.numel() * p.element_size() for p in model.parameters())
before = psutil.Process().memory_info().rss
fill_layers({int(i): m for i, m in model.named_children()}, run.folder, expected=layers_with_weights(run.args))
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"own": own, "added": peak - before}))
"""


def test_loading_weights_holds_the_model_plus_about_one_tensor(wide):
    """Filling a model from layout-free files (what every training rank does) adds its own parameters and little
    more: reading the files whole first would add the model twice."""
    proc = subprocess.run([sys.executable, "-c", LOAD, str(wide / "base")], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = (result["added"] - result["own"]) / 1e6
    print(f"loading: own parameters {result['own'] / 1e6:.0f} MB, added beyond them {extra:.0f} MB")
    assert extra < 2 * LAYER_MB, extra  # the largest tensor is the 8.4 MB embedding
