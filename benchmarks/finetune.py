"""Fine-tuning methods side by side, measured in the same run through `deepy.py train.py`.

    python -m benchmarks.finetune [--steps 100] [--precision fp32]          # the demo data (default)
    python -m benchmarks.finetune --shape bench [--steps 8] [--lora-r 16]    # the model benchmark's shape

Demo data (``make demo``'s: ``tools/prepare_data.py``, run here if needed): a tiny-preset base pretrained for
``--base-steps`` on the Shakespeare dataset, then full fine-tuning (``configs/finetune/full.yml``), LoRA
(``lora.yml``), Adapter (``adapter.yml``) and Adapter v2 (``adapter_v2.yml``) for the same ``--steps`` on the Alpaca
demo records, each from that base with its config's own learning rate. Printed per method: trainable parameters,
the optimizer state it saved (tensor bytes of DeepSpeed's optimizer state files), median step time, peak resident memory and the
validation loss after the same steps (response tokens of every validation record, computed the same way for all).
Then the adapter-interpolation sweep: a second LoRA run B (learning rate 3e-3 instead of 1e-2), and ``w A + (1 - w) B`` merged by
``tools/merge_lora.py``'s merge for w from -0.5 to 1.5, each with its validation loss.

``--shape bench`` (random data at 8 layers, hidden 512, seq 256, micro batch 8): full vs LoRA r 8 (query, value) vs
LoRA r ``--lora-r`` on every linear layer vs Adapter and Adapter v2, step time, memory and optimizer state only.
Target there: LoRA's optimizer state < 2 % of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PRESET = "configs/llama3/tiny.yml"
METHODS = {"full": "configs/finetune/full.yml", "LoRA": "configs/finetune/lora.yml",
           "Adapter": "configs/finetune/adapter.yml", "Adapter v2": "configs/finetune/adapter_v2.yml"}
WEIGHTS = (-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def deepy(*args: str) -> str:
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stderr


def optimizer_bytes(folder: Path) -> int:
    """Bytes of the optimizer state saved in ``folder``: the layout-free moments of ``optimizer/`` (checkpoints
    since 2026-12-07), else DeepSpeed's ``*optim_states.pt`` files, or at stage 0 (one rank) the ``optimizer`` entry
    of its model-states file."""
    moments = sorted((folder / "optimizer").glob("layer_*.safetensors"))
    if moments:
        from safetensors import safe_open

        total = 0
        for path in moments:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_slice(name)
                    size = {"F32": 4, "BF16": 2, "F16": 2}.get(tensor.get_dtype(), 4)
                    total += size * int(torch.tensor(tensor.get_shape()).prod().item())
        return total

    def tensor_bytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0

    total = 0
    for path in folder.glob("*_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        total += tensor_bytes(state.get("optimizer_state_dict") if "optim_states" in path.name else state.get("optimizer"))
    return total


def summary(save: Path, log: str, last_step: int) -> dict:
    """Step time, memory, trainable parameters and optimizer-state bytes of a finished run saved in ``save``."""
    records = [json.loads(line) for line in (save / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and r["step"] > 2] or [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    match = re.search(r"trainable parameters on this rank: ([\d,]+) of ([\d,]+)", log)
    trainable, total = (int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))) if match else (0, 0)
    optim = optimizer_bytes(save / f"global_step{last_step}")
    return {"step_time": statistics.median(r["step_time"] for r in train),
            "peak_mb": max(r["peak_memory_mb"] for r in train), "trainable": trainable, "total": total,
            "optimizer_bytes": optim, "trainer_valid_loss": valid[-1]["valid_loss"] if valid else None}


# --------------------------------------------------------------------------- demo data
def validation_loss(checkpoint: Path, adapter_config: Path, base: Path | None = None) -> float:
    """Mean loss over the response tokens of every validation record of the fine-tune whose config is
    ``adapter_config`` (its sft_data_path split by val_split_fraction and seed, as training splits it)."""
    import torch

    from neox_llama.checkpoint.run import load_model, load_run
    from neox_llama.config.loading import load_raw
    from neox_llama.data.instruction import load_records, resolve_style, split_records, tokenize

    raw, _ = load_raw([adapter_config], apply_presets=False)
    run = load_run(checkpoint) if base is None else load_run(base, adapters=[checkpoint])
    model, run = load_model(run)
    records, chat = load_records(ROOT / raw["sft_data_path"] if not Path(raw["sft_data_path"]).is_absolute()
                                 else raw["sft_data_path"])
    _, valid = split_records(records, raw["val_split_fraction"], raw.get("seed", 1234))
    style = resolve_style(raw.get("prompt_style"), chat, run.tokenizer)
    examples = tokenize(valid, run.tokenizer, style, raw["seq_length"], raw.get("mask_prompt", True), "validation")
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.as_tensor(example.ids, dtype=torch.long)[None]
            logits = model(ids[:, :-1])[0, :, : run.true_vocab].float()
            mask = torch.as_tensor(example.trained[1:])
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(losses[mask].sum())
            count += int(mask.sum())
    return total / count


def demo(opts: argparse.Namespace, work: Path) -> dict:
    from neox_llama.checkpoint.merge import Adapter, merge_to_checkpoint

    if not (ROOT / "data" / "alpaca_en_demo.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "tools" / "prepare_data.py")], cwd=ROOT, check=True)
    precision = [f"precision={opts.precision}"]
    base = work / "base"
    deepy(PRESET, "configs/local.yml", *precision, f"save={base}", "load=null", f"log_dir={base / 'logs'}",
          "tensorboard_dir=null", f"train_iters={opts.base_steps}", f"checkpoint_factor={opts.base_steps}",
          f"eval_interval={opts.base_steps}", f"master_port={opts.port}")
    steps = opts.steps
    common = [*precision, f"load={base}", f"train_iters={steps}", f"checkpoint_factor={steps}",
              f"eval_interval={steps}", "save_best=false", "tensorboard_dir=null", f"master_port={opts.port}"]
    results = {}
    for name, config in METHODS.items():
        save = work / name.replace(" ", "_")
        log = deepy(PRESET, config, *common, f"save={save}", f"log_dir={save / 'logs'}")
        result = summary(save, log, steps)
        result["valid_loss"] = validation_loss(save / f"global_step{steps}", save / f"global_step{steps}" / "config.yml")
        results[name] = result
        print(f"{name}: {result}", flush=True)
    lora_a = work / "LoRA" / f"global_step{steps}"
    save_b = work / "LoRA_b"
    # B: the same data order and validation split (the seed), another learning rate
    deepy(PRESET, METHODS["LoRA"], *common, "optimizer.params.lr=3e-3", f"save={save_b}", f"log_dir={save_b / 'logs'}")
    lora_b = save_b / f"global_step{steps}"
    sweep = {}
    for w in WEIGHTS:
        merged = work / f"blend_{w:+.2f}"
        merge_to_checkpoint([Adapter.open(lora_a, w), Adapter.open(lora_b, 1.0 - w)], merged)
        sweep[w] = validation_loss(merged, lora_a / "config.yml")
        print(f"blend w {w:+.2f}: valid loss {sweep[w]:.4f}", flush=True)
    return {"methods": results, "sweep": {str(w): v for w, v in sweep.items()},
            "lora_b_valid_loss": validation_loss(lora_b, lora_b / "config.yml")}


def print_demo(result: dict, steps: int) -> None:
    full = result["methods"]["full"]
    print(f"\n| method ({steps} steps, demo data) | trainable | optimizer state | step time | peak RSS | valid loss |")
    print("|---|---|---|---|---|---|")
    for name, r in result["methods"].items():
        print(f"| {name} | {r['trainable']:,} ({r['trainable'] / max(r['total'], 1):.2%}) | "
              f"{r['optimizer_bytes'] / 2**20:.2f} MB ({r['optimizer_bytes'] / full['optimizer_bytes']:.1%}) | "
              f"{r['step_time'] * 1000:.0f} ms | {r['peak_mb']:.0f} MB | {r['valid_loss']:.4f} |")
    print("\n| w (w A + (1 - w) B) | " + " | ".join(f"{float(w):+.2f}" for w in result["sweep"]) + " |")
    print("|---|" + "---|" * len(result["sweep"]))
    print("| valid loss | " + " | ".join(f"{v:.4f}" for v in result["sweep"].values()) + " |")


# --------------------------------------------------------------------------- benchmark shape
def bench_shape(opts: argparse.Namespace, work: Path) -> dict:
    from benchmarks.model_step import MICRO  # (run as python -m benchmarks.finetune from the project root)
    from benchmarks.train_step import SHAPE, write_random_corpus

    def run(name: str, *extra: str) -> str:
        return deepy(PRESET, *SHAPE, f"data_path={work / 'data'}", f"train_micro_batch_size_per_gpu={MICRO}",
                     "gradient_accumulation_steps=1", f"log_dir={work / name / 'logs'}", f"save={work / name}",
                     "split=100,0,0", f"precision={opts.precision}", f"master_port={opts.port}", *extra)

    write_random_corpus(work / "data")
    run("base", "train_iters=1", "checkpoint_factor=1")
    last = opts.steps + 2
    variants = {
        "full fine-tuning": [],
        "LoRA r 8 query,value": ["lora_r=8", "lora_alpha=16", "lora_targets=[query,value]", "lora_dropout=0.05"],
        f"LoRA r {opts.lora_r} all linear": [f"lora_r={opts.lora_r}", f"lora_alpha={2 * opts.lora_r}",
                                             "lora_targets=[query,key,value,output,mlp]", "lora_dropout=0.05"],
        "Adapter (10 tokens, all blocks)": ["peft_method=adapter", "adapter_start_layer=0"],
        "Adapter v2 (10 tokens, all blocks)": ["peft_method=adapter_v2", "adapter_start_layer=0"],
    }
    results = {}
    for index, (name, extra) in enumerate(variants.items()):
        save = f"run{index}"
        log = run(save, "finetune=true", f"load={work / 'base'}", f"train_iters={last}", f"checkpoint_factor={last}",
                  *extra)
        results[name] = summary(work / save, log, last)
    return {"methods": results}


def print_bench_shape(result: dict) -> None:
    runs = result["methods"]
    full = runs["full fine-tuning"]
    print(f"{'':36}{'step s':>8}{'peak RSS MB':>13}{'trainable':>14}{'optimizer MB':>14}")
    for name, r in runs.items():
        print(f"{name:36}{r['step_time']:8.3f}{r['peak_mb']:13.0f}{r['trainable']:14,}{r['optimizer_bytes'] / 2**20:14.2f}")
    for name, r in list(runs.items())[1:]:
        print(f"{name} / full: step time {r['step_time'] / full['step_time']:.2f}, peak RSS "
              f"{r['peak_mb'] / full['peak_mb']:.2f}, trainable {r['trainable'] / full['trainable']:.2%}, "
              f"optimizer state {r['optimizer_bytes'] / full['optimizer_bytes']:.2%}"
              + (" (target < 2%)" if name.startswith("LoRA") else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("demo", "bench"), default="demo")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: 100 on demo data, 8 at the bench shape)")
    parser.add_argument("--base-steps", type=int, default=300, help="demo data: pretraining steps of the base")
    parser.add_argument("--lora-r", type=int, default=16, help="bench shape: rank of the all-linear LoRA run")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--port", type=int, default=29533, help="master_port of the runs")
    opts = parser.parse_args()
    opts.steps = opts.steps or (100 if opts.shape == "demo" else 8)
    started = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as tmp:
        if opts.shape == "demo":
            result = demo(opts, Path(tmp))
            print_demo(result, opts.steps)
        else:
            result = bench_shape(opts, Path(tmp))
            print_bench_shape(result)
    out = ROOT / "runs" / "bench" / f"finetune-{opts.shape}-{started}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps({"options": vars(opts), **result}, indent=2))
    out.with_suffix(".tmp").rename(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
