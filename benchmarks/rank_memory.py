"""The per-rank host-memory estimate (``deepy.py --dry-run``, the one deepy.py's memory check adds up) against the
measured peak of real CPU runs, small models included, where the rank's own runtime and its data-loader workers
are most of it.

    python -m benchmarks.rank_memory [--cases tiny,tiny-workers,tiny-2ranks,bench-shape]

Each case runs ``deepy.py train.py`` (fp32, ZeRO 1, evaluation every few steps and a test split, so the training,
validation and test loaders all start their workers) on a random corpus, while every rank and its data-loader
workers are sampled from outside every 0.05 s with psutil. A rank's measured figure is the peak over time of its
own resident memory (RSS: Python, torch, DeepSpeed, the model and its states, activations) plus what each of its
workers holds alone (USS: the workers are forked from the rank and share the rest of their pages with it, so their
RSS would count the rank's memory again). Printed per case: the estimate per rank, the measured peak (rank RSS,
workers' USS, their sum), and the ratio estimate / measured; target 0.75-1.25 (within 25 %).

It also prints the two baselines the estimate uses (neox_llama/planning/memory.py): a rank's runtime (the tiny
case's peak RSS less the estimate's model terms) and one data-loader worker (the workers' share of the
tiny-workers case).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.train_step import write_random_corpus
from neox_llama.planning.memory import CPU_RUNTIME, DATA_WORKER

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
BASE = ["configs/llama3/tiny.yml", "tokenizer_type=null", "vocab_file=null", "vocab_size=8192", "precision=fp32",
        "zero_optimization.stage=1", "save=null", "load=null", "tensorboard_dir=null", "split=98,1,1",
        "log_interval=5", "peak_tflops=1.0", "num_workers=0", "train_iters=20", "eval_interval=5", "eval_iters=2"]
BENCH_SHAPE = ["num_layers=8", "hidden_size=512", "num_attention_heads=8", "num_kv_heads=4", "intermediate_size=1408",
               "seq_length=256", "max_position_embeddings=256", "train_iters=4", "eval_interval=2"]
"""benchmarks/run.py's shape (32 M parameters; micro batch 8, the tiny preset's)."""
CASES = {
    "tiny": [],
    "tiny-bf16": ["precision=bf16"],
    "tiny-workers": ["num_workers=2"],
    "tiny-2ranks": ["num_gpus=2", "num_workers=2"],
    "bench-shape": [*BENCH_SHAPE, "num_workers=2"],
}


@dataclass
class Peak:
    """One rank's peaks (bytes)."""

    total: float = 0.0
    """Rank RSS + workers' USS, at its peak."""
    rank_rss: float = 0.0
    workers_uss: float = 0.0
    """The workers' USS at the time of ``total``'s peak."""
    workers: int = 0
    """The most workers seen at once."""
    worker_uss: list[float] = field(default_factory=list)


def _is_rank(proc: psutil.Process) -> bool:
    line = proc.cmdline()
    return any(a.endswith("train.py") for a in line) and "--config" in line and "deepspeed.launcher" not in " ".join(line)


def sample(proc: subprocess.Popen, peaks: dict[int, Peak]) -> None:
    """Sample every rank under ``proc`` (and its workers: the rank's child processes) until it exits."""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            everyone = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for rank in everyone:
            try:
                if not _is_rank(rank) or (rank.parent() is not None and _is_rank(rank.parent())):
                    continue  # a worker (forked from its rank, with the rank's command line)
                rss = rank.memory_info().rss
                workers = [w.memory_full_info().uss for w in rank.children(recursive=True)]
            except psutil.Error:
                continue
            peak = peaks.setdefault(rank.pid, Peak())
            peak.rank_rss = max(peak.rank_rss, rss)
            peak.workers = max(peak.workers, len(workers))
            peak.worker_uss += workers
            if rss + sum(workers) > peak.total:
                peak.total, peak.workers_uss = rss + sum(workers), sum(workers)
        time.sleep(0.05)


def estimate(work: Path, settings: list[str]) -> float:
    """deepy.py --dry-run's per-rank total (bytes)."""
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", *BASE, f"data_path={work / 'data'}",
           f"log_dir={work / 'dry'}", *settings, "--dry-run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    match = re.search(r"total ([\d.]+) GiB \((?:with|without)", proc.stdout)
    if not match:
        raise SystemExit(f"no memory estimate in the dry run:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return float(match.group(1)) * 2**30


def model_terms(work: Path) -> float:
    """The tiny case's estimate less the runtime and workers (what the model, its states and activations add)."""
    return estimate(work, CASES["tiny"]) - CPU_RUNTIME


def run_case(work: Path, name: str) -> dict[int, Peak]:
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", *BASE, f"data_path={work / 'data'}",
           f"log_dir={work / name}", *CASES[name]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    peaks: dict[int, Peak] = {}
    sample(proc, peaks)
    reader.join(5)
    if proc.returncode:
        raise SystemExit(f"{name}: deepy.py failed:\n{''.join(log[-40:])}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    opts = parser.parse_args()
    names = opts.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)}; cases are {', '.join(CASES)}")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_random_corpus(work / "data")
        for name in names:
            est = estimate(work, CASES[name])
            results[name] = run_case(work, name)
            for peak in results[name].values():
                rows.append((name, est, peak))
            print(f"{name}: done", flush=True)
        terms = model_terms(work) if "tiny" in results else None
    print("case          ranks workers  estimate MiB  rank RSS MiB  workers USS MiB  measured MiB  ratio  met")
    for name, est, peak in rows:
        ratio = est / peak.total
        print(f"{name:13s} {len(results[name]):5d} {peak.workers:7d}  {est / MIB:12.0f}  {peak.rank_rss / MIB:12.0f}  "
              f"{peak.workers_uss / MIB:15.0f}  {peak.total / MIB:12.0f}  {ratio:5.2f}  "
              f"{'yes' if 0.75 <= ratio <= 1.25 else 'NO'}")
    print("target: estimate / measured within 0.75-1.25 for every rank")
    if terms is not None:
        tiny = max(p.rank_rss for p in results["tiny"].values())
        print(f"runtime baseline: the tiny case's peak RSS {tiny / MIB:.0f} MiB less the estimate's model terms "
              f"{terms / MIB:.0f} MiB = {(tiny - terms) / MIB:.0f} MiB (memory.CPU_RUNTIME {CPU_RUNTIME / MIB:.0f} MiB)")
    if "tiny-workers" in results:
        uss = [u for p in results["tiny-workers"].values() for u in p.worker_uss]
        print(f"data-loader worker: USS {min(uss) / MIB:.0f}-{max(uss) / MIB:.0f} MiB over "
              f"{len(uss)} samples (memory.DATA_WORKER {DATA_WORKER / MIB:.0f} MiB)")


if __name__ == "__main__":
    main()
