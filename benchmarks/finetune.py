"""LoRA vs full fine-tuning at the benchmark shape, measured in the same run through `deepy.py train.py`.

    python -m benchmarks.finetune [--steps 8] [--lora-r 16]

Shape: the model benchmark's (8 layers, hidden 512, 8/4 heads, intermediate 1408, vocab 8192, seq 256,
micro batch 8), bf16, ZeRO 1, 1 rank. A one-step pretraining run makes the base; then a full fine-tune and a
LoRA fine-tune at the defaults' targets (r 8 on query and value) and one on every linear layer (r 16 on query,
key, value, output and mlp) start from it. Printed per run: median step time,
peak resident memory of the rank (ru_maxrss), trainable parameters (from the model the run built), and the
optimizer state it saved (the size of DeepSpeed's optim_states file: fp32 master weights and Adam moments).
Target: LoRA's optimizer state < 2 % of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.model_step import MICRO
from benchmarks.train_step import SHAPE, write_random_corpus

ROOT = Path(__file__).resolve().parents[1]


def deepy(work: Path, name: str, *extra: str) -> str:
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", "configs/llama3/tiny.yml", *SHAPE,
           f"data_path={work / 'data'}", f"train_micro_batch_size_per_gpu={MICRO}", "gradient_accumulation_steps=1",
           f"log_dir={work / name / 'logs'}", f"save={work / name}", "split=100,0,0", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stderr


def measure(work: Path, name: str, steps: int, *extra: str) -> dict:
    log = deepy(work, name, "finetune=true", f"load={work / 'base'}", f"train_iters={steps + 2}",
                f"checkpoint_factor={steps + 2}", *extra)
    records = [json.loads(line) for line in (work / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and r["step"] > 2]
    match = re.search(r"trainable parameters on this rank: ([\d,]+) of ([\d,]+)", log)
    trainable, total = (int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))) if match else (0, 0)
    optim = sum(p.stat().st_size for p in (work / name / f"global_step{steps + 2}").glob("*optim_states.pt"))
    return {"step_time": statistics.median(r["step_time"] for r in train),
            "peak_mb": max(r["peak_memory_mb"] for r in train), "trainable": trainable, "total": total,
            "optimizer_bytes": optim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_random_corpus(work / "data")
        deepy(work, "base", "train_iters=1", "checkpoint_factor=1")
        full = measure(work, "full", opts.steps)
        runs = {"full fine-tuning": full,
                "LoRA r 8 query,value": measure(work, "lora8", opts.steps, "lora_r=8", "lora_alpha=16",
                                                "lora_targets=[query,value]", "lora_dropout=0.05"),
                f"LoRA r {opts.lora_r} all linear": measure(
                    work, "lora_all", opts.steps, f"lora_r={opts.lora_r}", f"lora_alpha={2 * opts.lora_r}",
                    "lora_targets=[query,key,value,output,mlp]", "lora_dropout=0.05")}
    print(f"{'':26}{'step s':>8}{'peak RSS MB':>13}{'trainable':>14}{'optimizer MB':>14}")
    for name, r in runs.items():
        print(f"{name:26}{r['step_time']:8.3f}{r['peak_mb']:13.0f}{r['trainable']:14,}{r['optimizer_bytes'] / 2**20:14.2f}")
    for name, r in list(runs.items())[1:]:
        print(f"{name} / full: step time {r['step_time'] / full['step_time']:.2f}, peak RSS "
              f"{r['peak_mb'] / full['peak_mb']:.2f}, trainable {r['trainable'] / full['trainable']:.2%}, "
              f"optimizer state {r['optimizer_bytes'] / full['optimizer_bytes']:.2%} (target < 2%)")


if __name__ == "__main__":
    main()
