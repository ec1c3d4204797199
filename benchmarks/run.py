"""Every speed benchmark in one command: ours against a reference measured in the same run, interleaved.

    python benchmarks/run.py [--quick] [--only CASE[,CASE...]] [--repeats N] [--bf16 auto|on|off]
    make bench

For each case, ours (A) and its reference (B) each run in a fresh process, alternating A B A B ... ``--repeats``
times, so that load from other processes hits both; the case's ratio is the median of the per-pair ratios.
Printed per case: both figures (medians), the ratio and its target, our MFU against a matmul peak measured at the
start of this run, and our peak RSS. The whole run is written to ``runs/bench/<timestamp>.json``.

Benchmark shape: 8 layers, hidden 512, heads 8 / kv 4, intermediate 1408, vocab 8192, seq 256, micro batch 8,
2 threads. bf16 cases run when this CPU multiplies bf16 natively (``--bf16 auto``: its measured bf16 matmul peak is
at least half the fp32 one); a CPU without AVX-512-BF16/AMX emulates bf16 at about 1 % of its fp32 speed, where a
bf16 step of this shape takes minutes, and the table says so instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One comparison: the two sides' arguments to benchmarks/sides.py and what the ratio means."""

    name: str
    what: str
    ours: list[str]
    reference: list[str]
    target: float
    unit: str = "tok/s"
    precision: str = "fp32"
    """The precision of the matmul peak our MFU is measured against (None: no MFU for this case)."""
    mfu: bool = True
    target_max: float | None = None
    """An upper bound too: the ratio must lie in [target, target_max] (an estimate against a measurement)."""


def cases(quick: bool) -> list[Case]:
    steps = ["--steps", "2" if quick else "4"]
    deepy_steps = ["--steps", "3" if quick else "6"]
    q = ["--quick"] if quick else []
    result = []
    for precision in ("bf16", "fp32"):
        p = ["--precision", precision]
        result.append(Case(f"model_step_{precision}", f"bare model step ({precision}) vs transformers + AdamW",
                           ["model_step", *p, *steps], ["model_step", "--reference", *p, *steps],
                           1.5 if precision == "bf16" else 1.0, precision=precision))
        result.append(Case(f"deepy_{precision}", f"deepy.py train.py, 1 rank ({precision}) vs transformers loop",
                           ["deepy", *p, *deepy_steps], ["reference_loop", *p, *steps],
                           1.5 if precision == "bf16" else 1.0, precision=precision))
    result += [
        Case("pipeline", "deepy.py 2-stage pipeline, 8 micro-batches vs 1 rank, equal global batch (fp32)",
             ["deepy", "--pipeline", *deepy_steps], ["deepy", "--global-batch", *deepy_steps], 0.8),
        Case("preprocess", "preprocess_data, 1 worker vs tiktoken's encode_batch on one thread (Llama-3)",
             ["preprocess", *q], ["preprocess", "--reference", *q], 0.9, mfu=False),
        Case("dataloader", "packed batch loading vs the fp32 model step it feeds (samples/s; ratio = step/load)",
             ["dataloader"], ["dataloader", "--reference", "--steps", "2"], 100.0, unit="samples/s", mfu=False),
        Case("generate", "greedy decoding with KV cache vs transformers.generate (fp32)",
             ["generate", *q], ["generate", "--reference", *q], 1.0, mfu=False),
        # ZeRO 1 on 2 data-parallel ranks (1 thread each): one fp32 rank runs stage 1 as 0 (config.engine_zero_stage)
        *[Case(f"memory_zero{stage}", f"--dry-run per-rank memory estimate vs the measured peak RSS, ZeRO {stage} "
               f"(fp32, {ranks})", ["dry_run", *layout], ["deepy", "--report-peak", *layout, *deepy_steps],
               0.8, unit="MB", mfu=False, target_max=1.2)
          for stage, ranks, layout in ((0, "1 rank", ["--set", "zero_optimization.stage=0"]),
                                       (1, "rank 0 of 2", ["--set", "zero_optimization.stage=1", "--set", "num_gpus=2"]))],
        Case("lora", "deepy.py LoRA r 8 (query, value) vs full fine-tuning, fp32 (tokens/s)",
             ["deepy", "--finetune", "--set", "lora_r=8", "--set", "lora_targets=[query,value]", *deepy_steps],
             ["deepy", "--finetune", *deepy_steps], 1.0, mfu=False),  # (a frozen base costs fewer FLOPs)
    ]
    return result


@dataclass
class Result:
    name: str
    what: str
    ours: float = 0.0
    reference: float = 0.0
    ratio: float = 0.0
    target: float = 0.0
    unit: str = "tok/s"
    mfu: float | None = None
    peak_rss_mb: float = 0.0
    reference_rss_mb: float = 0.0
    target_max: float | None = None
    pairs: list[tuple[float, float]] = field(default_factory=list)
    note: str = ""


def run_side(args: list[str], threads: int) -> dict:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS=str(threads),
               WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "benchmarks.sides", *args, "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(args)} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return json.loads(lines[-1])


def flops_per_token() -> float:
    """Training FLOPs per token of the benchmark shape (the trainer's formula: 6 x non-embedding parameters
    + 12 x layers x heads x head_dim x seq)."""
    try:
        from benchmarks.model_step import ARGS, SEQ
    except ImportError:  # `python benchmarks/run.py`: this folder, not the root, is on sys.path
        from model_step import ARGS, SEQ

    a = ARGS
    kv = a.num_kv_heads * a.head_dim
    q = a.num_attention_heads * a.head_dim
    per_layer = 2 * a.hidden_size + 2 * a.hidden_size * q + 2 * a.hidden_size * kv + 3 * a.hidden_size * a.intermediate_size
    non_embedding = a.num_layers * per_layer + a.hidden_size + a.vocab_size * a.hidden_size
    return 6 * non_embedding + 12 * a.num_layers * q * SEQ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (about a third of the time)")
    parser.add_argument("--only", help="comma-separated case names (see the table)")
    parser.add_argument("--repeats", type=int, help="A B pairs per case (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    opts = parser.parse_args()
    import torch

    from neox_llama.utils.peak import measure_matmul_tflops

    torch.set_num_threads(opts.threads)
    all_cases = cases(opts.quick)
    names = [c.name for c in all_cases]
    chosen = opts.only.split(",") if opts.only else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise SystemExit(f"--only: unknown case {', '.join(unknown)}; cases are {', '.join(names)}")
    repeats = opts.repeats or (1 if opts.quick else 3)
    peaks = {"fp32": measure_matmul_tflops(torch.float32, size=2048, tries=4) * 1e3,
             "bf16": measure_matmul_tflops(torch.bfloat16, tries=3) * 1e3}
    native_bf16 = peaks["bf16"] >= 0.5 * peaks["fp32"]
    print(f"threads {opts.threads}; matmul peak measured now: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 "
          f"{peaks['bf16']:.0f} GFLOP/s ({'native' if native_bf16 else 'emulated: no AVX-512-BF16/AMX'}); "
          f"{repeats} A/B pair(s) per case", flush=True)
    results = []
    for case in all_cases:
        if case.name not in chosen:
            continue
        result = Result(case.name, case.what, target=case.target, unit=case.unit, target_max=case.target_max)
        if case.precision == "bf16" and (opts.bf16 == "off" or (opts.bf16 == "auto" and not native_bf16)):
            result.note = (f"skipped: bf16 matmul runs at {peaks['bf16'] / peaks['fp32']:.1%} of fp32 on this CPU "
                           "(--bf16 on to run it anyway)")
            results.append(result)
            print(f"{case.name:16s} {result.note}", flush=True)
            continue
        started = time.perf_counter()
        ours, theirs = [], []
        try:
            for _ in range(repeats):
                ours.append(run_side(case.ours, opts.threads))
                theirs.append(run_side(case.reference, opts.threads))
        except RuntimeError as err:
            result.note = f"failed: {err}"
            results.append(result)
            print(f"{case.name:16s} {result.note}", flush=True)
            continue
        result.pairs = [(a["rate"], b["rate"]) for a, b in zip(ours, theirs, strict=True)]
        ratios = [a / b for a, b in result.pairs]
        result.ratio = statistics.median(ratios)
        result.ours = statistics.median(a for a, _ in result.pairs)
        result.reference = statistics.median(b for _, b in result.pairs)
        result.peak_rss_mb = max(a["peak_rss_mb"] for a in ours)
        result.reference_rss_mb = max(b["peak_rss_mb"] for b in theirs)
        if case.mfu and case.unit == "tok/s":
            result.mfu = result.ours * flops_per_token() / 1e9 / peaks[case.precision]
        results.append(result)
        print(f"{case.name:16s} ours {result.ours:9.1f}  ref {result.reference:9.1f} {case.unit:9s} "
              f"ratio {result.ratio:5.2f} (target {target_text(result)})  "
              f"{time.perf_counter() - started:5.0f} s", flush=True)
    print()
    print(table(results, peaks))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"threads": opts.threads, "quick": opts.quick, "repeats": repeats,
                               "matmul_peak_gflops": peaks, "cases": [asdict(r) for r in results]}, indent=1))
    tmp.replace(path)
    print(f"\nwritten {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def met_target(r: Result) -> bool:
    return r.ratio >= r.target and (r.target_max is None or r.ratio <= r.target_max)


def target_text(r: Result) -> str:
    return f">= {r.target:g}" if r.target_max is None else f"{r.target:g}-{r.target_max:g}"


def table(results: list[Result], peaks: dict) -> str:
    header = (f"{'case':16s} {'ours':>10s} {'reference':>10s} {'unit':9s} {'ratio':>6s} {'target':>9s} {'met':4s} "
              f"{'MFU':>6s} {'RSS MB':>7s} {'ref RSS':>7s}")
    rows = [header, "-" * len(header)]
    for r in results:
        if r.note:
            rows.append(f"{r.name:16s} {r.note}")
            continue
        met = "yes" if met_target(r) else "NO"
        mfu = f"{r.mfu:6.1%}" if r.mfu is not None else f"{'':6s}"
        rows.append(f"{r.name:16s} {r.ours:10.1f} {r.reference:10.1f} {r.unit:9s} {r.ratio:6.2f} {target_text(r):>9s} "
                    f"{met:4s} {mfu} {r.peak_rss_mb:7.0f} {r.reference_rss_mb:7.0f}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
