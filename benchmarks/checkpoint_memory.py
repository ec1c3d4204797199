"""Host memory of saving and restoring the layout-free training state (fp32 masters, Adam's moments) under ZeRO-3
on 4 ranks: what each rank holds above its steady state while it writes a checkpoint, and while a resumed run puts
the optimizer state back into a fresh engine.

    python -m benchmarks.checkpoint_memory

Shape: the scale benchmark's 551 M model (hidden 1536, 16 layers, 12 heads, intermediate 4096, vocab 32000; its
largest layer is the 49 M-parameter embedding), bf16, seq 256, micro batch 1, ZeRO-3 on 4 ranks with
``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` at 1e8 so that four ranks fit in 24 GiB. Run 1
trains one step and saves; run 2 resumes it (same layout: the same path as any other) and trains one more. Every
rank's RSS is sampled from outside every 0.1 s (psutil). Printed per rank: the RSS when the save starts and its
peak during the save, the RSS when the engine is built and its peak while the state is restored (less the moments the restore creates for
good, this rank's 1.10 GB), each extra against the largest layer's fp32 master and two moments (0.59 GB) — the
streaming target is about one layer.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.memory import ROOT, _ranks, write_corpus

SHAPE = ["num_layers=16", "hidden_size=1536", "num_attention_heads=12", "num_kv_heads=12", "intermediate_size=4096",
         "vocab_size=32000", "make_vocab_size_divisible_by=128", "seq_length=256", "max_position_embeddings=256",
         "tokenizer_type=null", "vocab_file=null", "precision=bf16", "train_micro_batch_size_per_gpu=1",
         "gradient_accumulation_steps=1", "train_batch_size=null", "checkpoint_factor=1", "eval_iters=0",
         "log_interval=1", "num_workers=0", "tensorboard_dir=null", "split=100,0,0", "peak_tflops=1.0",
         "num_gpus=4", "zero_optimization.stage=3", "zero_optimization.stage3_max_live_parameters=100000000",
         "zero_optimization.stage3_max_reuse_distance=100000000", "zero_optimization.stage3_prefetch_bucket_size=0"]
LARGEST_LAYER = 32000 * 1536 * 4 * 3
"""The embedding's fp32 master and two fp32 moments, in bytes."""
MOMENTS_PER_RANK = 551_000_000 // 4 * 8
"""What a restore adds for good: this rank's share of Adam's two fp32 moments (a fresh engine has none)."""


def run(work: Path, iters: int, marks: dict[str, str]) -> dict[int, dict[str, float]]:
    """Per rank: the RSS at each mark's line and the peak RSS between each mark and the next."""
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", "configs/llama3/tiny.yml", *SHAPE,
           f"train_iters={iters}", f"data_path={work / 'data'}", f"save={work / 'ck'}", f"load={work / 'ck'}",
           f"log_dir={work / 'logs'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phase = {"now": None}
    log: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            log.append(line)
            for name, mark in marks.items():
                if mark in line and "[rank 0]" in line:
                    phase["now"] = name

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: dict[int, dict[str, float]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        now = phase["now"]
        for rank, p in _ranks(root).items():
            try:
                rss = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            if now is not None:
                slot = seen.setdefault(rank, {})
                slot.setdefault(f"{now}_start", rss)
                slot[f"{now}_peak"] = max(slot.get(f"{now}_peak", 0.0), rss)
        time.sleep(0.1)
    reader.join(5)
    if proc.returncode:
        raise SystemExit(f"deepy.py failed:\n{''.join(log[-40:])}")
    return seen


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_corpus(work / "data")
        saving = run(work, 1, {"step": "INFO train: step ", "save": "INFO train: step      1 |",
                               "after": "saved checkpoint"})
        restoring = run(work, 2, {"restore": "optimizer AdamW", "data": "resumed from"})
    print("rank  save: start GB  peak GB  extra GB  / largest layer | restore: start GB  peak GB  extra GB  / largest "
          "layer")
    for rank in sorted(saving):
        s, r = saving[rank], restoring.get(rank, {})
        save_extra = s["save_peak"] - s["save_start"]
        restore_extra = r.get("restore_peak", 0.0) - r.get("restore_start", 0.0) - MOMENTS_PER_RANK
        print(f"{rank:4d}  {s['save_start'] / 1e9:14.2f}  {s['save_peak'] / 1e9:7.2f}  {save_extra / 1e9:8.2f}  "
              f"{save_extra / LARGEST_LAYER:15.2f} | {r.get('restore_start', 0.0) / 1e9:17.2f}  "
              f"{r.get('restore_peak', 0.0) / 1e9:7.2f}  {restore_extra / 1e9:8.2f}  "
              f"{restore_extra / LARGEST_LAYER:15.2f}")
    print("target: each extra about one layer (the largest: 0.59 GB), never the whole model's state (6.6 GB)")


if __name__ == "__main__":
    main()
