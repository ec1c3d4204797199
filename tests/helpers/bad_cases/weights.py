"""Non-finite weights: merge_lora.py refuses a weight that is not finite or too large, and a merge that overflows,
before anything is left at --output; every reader of a checkpoint (generate, evaluate, export, a fine-tune's load,
the Hugging Face import) refuses a tensor holding NaN or Inf, naming the file and the tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from helpers.bad_inputs import copy_run, deepy, tool, tree_hash
from helpers.lora import SETTINGS, adapter_checkpoint

POISONED = "layer_001.safetensors: tensor attention.query.weight holds non-finite values (1 NaN, 0 Inf of 4096)"


def _poison(path: Path, name: str, value: float = float("nan")) -> None:
    """Set one value of tensor ``name`` in the safetensors file ``path`` (written with safetensors itself)."""
    tensors = load_file(str(path))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def _poisoned_run(world, tmp_path) -> tuple[Path, list]:
    """A copy of the world's run whose last checkpoint has one NaN in layer 1's query weight; and its hash."""
    run_dir = copy_run(world, tmp_path)
    _poison(run_dir / "ck/global_step2/weights/layer_001.safetensors", "attention.query.weight")
    return run_dir, [(run_dir / "ck", tree_hash(run_dir / "ck"))]


def _nothing_at(output: Path) -> None:
    assert not output.exists(), f"{output} was written"
    assert not list(output.parent.glob(f".{output.name}.*")), f"a temporary folder of {output} was left behind"


def _merge(world, tmp_path, *args: str):
    lora = adapter_checkpoint(tmp_path / "lora", world["w"] / "run/ck/global_step2", SETTINGS, seed=1)
    before = tree_hash(lora)
    proc = tool("merge_lora.py", "--checkpoint", lora, *args, "--output", tmp_path / "merged")
    _nothing_at(tmp_path / "merged")
    return proc, lora, [(lora, before)]


def case_weights_merge_lora_nan_weight(world, tmp_path):
    proc, lora, protected = _merge(world, tmp_path, "--weight", "nan")
    return proc, f"merge_lora.py: error: --weight nan for {lora}: not a finite number", protected


def case_weights_merge_lora_inf_weight(world, tmp_path):
    proc, lora, protected = _merge(world, tmp_path, "--weight", "inf", "--force")  # --force never takes Inf
    return proc, f"merge_lora.py: error: --weight inf for {lora}: not a finite number", protected


def case_weights_merge_lora_huge_weight(world, tmp_path):
    proc, lora, protected = _merge(world, tmp_path, "--weight", "1e30")
    return proc, f"--weight 1e+30 for {lora}: outside -10..10 (1 = the update as trained); pass --force", protected


def case_weights_merge_lora_forced_weight_that_overflows(world, tmp_path):
    proc, lora, protected = _merge(world, tmp_path, "--weight", "1e39", "--force")
    return proc, ("layer_001.safetensors: tensor attention.dense.weight holds non-finite values (0 NaN, 4096 Inf of "
                  f"4096); merging {lora} x 1e+39 overflows; lower the --weight"), protected


def case_weights_generate_nan_tensor(world, tmp_path):
    run_dir, protected = _poisoned_run(world, tmp_path)
    return tool("generate.py", "--checkpoint", run_dir / "ck", "--prompt", "x"), POISONED, protected


def case_weights_evaluate_nan_tensor(world, tmp_path):
    run_dir, protected = _poisoned_run(world, tmp_path)
    proc = tool("evaluate.py", "--checkpoint", run_dir / "ck", "--data-path", world["w"] / "data_text_document")
    return proc, POISONED, protected


def case_weights_convert_to_hf_nan_tensor(world, tmp_path):
    run_dir, protected = _poisoned_run(world, tmp_path)
    proc = tool("convert_to_hf.py", "--checkpoint", run_dir / "ck", "--output", tmp_path / "hf")
    _nothing_at(tmp_path / "hf")
    return proc, POISONED, protected


def case_weights_finetune_from_a_nan_tensor(world, tmp_path):
    run_dir, protected = _poisoned_run(world, tmp_path)
    proc = deepy(world, tmp_path / "ft", "finetune=true", f"load={run_dir / 'ck'}", "train_iters=1")
    assert not list((tmp_path / "ft").glob("**/global_step*")), "a checkpoint was saved"
    return proc, POISONED, protected


def case_weights_convert_from_hf_inf_tensor(world, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(world["w"] / "hf", hf)
    _poison(hf / "model.safetensors", "model.layers.0.mlp.up_proj.weight", float("inf"))
    before = tree_hash(hf)
    proc = tool("convert_from_hf.py", "--hf", hf, "--output", tmp_path / "o")
    _nothing_at(tmp_path / "o")
    return proc, "model.safetensors: tensor model.layers.0.mlp.up_proj.weight holds non-finite values (0 NaN, 1 Inf", \
        [(hf, before)]


def case_weights_convert_to_hf_fp16_overflow(world, tmp_path):
    run_dir = copy_run(world, tmp_path)
    _poison(run_dir / "ck/global_step2/weights/layer_001.safetensors", "attention.query.weight", 1e6)  # finite
    before = tree_hash(run_dir / "ck")
    proc = tool("convert_to_hf.py", "--checkpoint", run_dir / "ck", "--output", tmp_path / "hf", "--dtype", "fp16")
    _nothing_at(tmp_path / "hf")
    return proc, ("layer_001.safetensors: tensor attention.query.weight holds non-finite values (0 NaN, 1 Inf of "
                  "4096); its values do not fit fp16 (largest 65504); export with --dtype bf16 or fp32"), \
        [(run_dir / "ck", before)]
