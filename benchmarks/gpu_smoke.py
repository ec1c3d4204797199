"""GPU smoke run and benchmark: which SDPA kernel runs, then `deepy.py train.py` for 20 bf16 steps of the Llama-3.2-1B
shape at seq 2048 over NCCL on 1 GPU (and 2 when there are 2), printing tokens/s and MFU.

    bash benchmarks/gpu_smoke.sh          # or: python -m benchmarks.gpu_smoke [--steps 20] [--micro 4]

The SDPA check profiles one causal attention forward and backward of the model's shape (32 query heads, 8
key/value heads, head dim 64, bf16) and fails unless a flash or memory-efficient kernel ran (never the math
fallback). Training uses random token ids (no tokenizer), ZeRO 1, torch's AdamW (`optimizer.params.torch_adam`:
nothing for DeepSpeed to compile), MFU against the device's dense bf16 peak (`--peak-tflops`, default from the
device name: H100/H200 989, A100 312; else measured by the run). Needs CUDA; CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from neox_llama.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 TFLOP/s by device name."""


def sdpa_kernels() -> list[str]:
    """Names of the attention kernels one bf16 causal GQA attention (forward + backward) ran."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(2, 32, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ("flash", "fmha", "efficient",
                                                                                          "attention", "softmax"))})


def train(work: Path, gpus: int, steps: int, micro: int, peak: float | None) -> dict:
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", "configs/llama3.2/1B.yml", "tokenizer_type=null",
           "vocab_file=null", "seq_length=2048", f"train_micro_batch_size_per_gpu={micro}",
           "gradient_accumulation_steps=1", "train_batch_size=null", f"train_iters={steps}", "warmup_iters=2",
           "eval_iters=0", "log_interval=1", "checkpoint_factor=100000", "tensorboard_dir=null", "split=100,0,0",
           "zero_optimization.stage=1", "optimizer.params.torch_adam=true", f"num_gpus={gpus}",
           f"data_path={work / 'data'}", f"save={work / f'run{gpus}'}", f"log_dir={work / f'run{gpus}' / 'logs'}",
           *([f"peak_tflops={peak}"] if peak else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"deepy.py on {gpus} GPU(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (work / f"run{gpus}" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "loss" in r and r["step"] > 3]
    return {"tokens_per_sec": float(np.median([r["tokens_per_sec"] for r in steady])),
            "mfu": float(np.median([r["mfu"] for r in steady])), "loss": steady[-1]["loss"],
            "peak_memory_gb": max(r["peak_memory_mb"] for r in steady) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the GPU smoke run needs one")
    name = torch.cuda.get_device_name()
    peak = opts.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    kernels = sdpa_kernels()
    print(f"device {name} x {torch.cuda.device_count()}, torch {torch.__version__}, peak bf16 {peak} TFLOP/s")
    print("SDPA kernels:", ", ".join(kernels))
    if not any(w in k.lower() for k in kernels for w in ("flash", "fmha", "efficient")):
        raise SystemExit("SDPA ran neither the flash nor the memory-efficient kernel")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = np.random.RandomState(0)
        with IndexedDatasetWriter(work / "data", np.int32) as writer:
            for _ in range(2 * opts.steps * opts.micro * 2 + 8):
                writer.add_document(rng.randint(0, 128256, size=2100))
        for gpus in (1, 2) if torch.cuda.device_count() >= 2 else (1,):
            r = train(work, gpus, opts.steps, opts.micro, peak)
            print(f"{gpus} GPU(s): {r['tokens_per_sec']:,.0f} tok/s, MFU {r['mfu']:.1%}, peak memory "
                  f"{r['peak_memory_gb']:.1f} GiB, last loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
