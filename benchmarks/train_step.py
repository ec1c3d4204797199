"""Cost of the full DeepSpeed training path vs a bare model step and a plain transformers loop, same run.

    python -m benchmarks.train_step [--steps 8]

Shape: the model benchmark's (8 layers, hidden 512, 8/4 heads, intermediate 1408, vocab 8192, seq 256,
micro batch 8), bf16. Prints tokens/s of: our bare model step (autocast, torch AdamW), transformers'
LlamaForCausalLM with the same loop, `deepy.py train.py` on 1 rank (DeepSpeed engine, bf16, ZeRO 1), and
a 2-stage pipeline on 2 ranks at the same global batch (its ratio to 1 rank shows the pipeline bubble).
Target: DeepSpeed overhead <= 10% (ratio >= 0.9 against the bare step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.model_step import ARGS, MICRO, SEQ
from neox_llama.data.indexed import IndexedDatasetWriter
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss, token_weights

ROOT = Path(__file__).resolve().parents[1]
SHAPE = [f"num_layers={ARGS.num_layers}", f"hidden_size={ARGS.hidden_size}", f"num_attention_heads={ARGS.num_attention_heads}",
         f"num_kv_heads={ARGS.num_kv_heads}", f"intermediate_size={ARGS.intermediate_size}", f"vocab_size={ARGS.vocab_size}",
         f"seq_length={SEQ}", "tokenizer_type=null", "vocab_file=null", "precision=bf16", "zero_optimization.stage=1",
         "log_interval=1", "eval_iters=0", "num_workers=0", "checkpoint_factor=100000", "tensorboard_dir=null"]


def bare_step_tokens_per_sec(steps: int, hf: bool = False) -> float:
    ids = torch.randint(0, ARGS.vocab_size, (MICRO, SEQ + 1))
    weights = token_weights(torch.ones(MICRO, SEQ), MICRO * SEQ)
    if hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        from neox_llama.convert.hf_names import hf_config_dict

        model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(ARGS), attn_implementation="sdpa"))
        run = lambda: model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # noqa: E731
    else:
        model, loss_fn = build_model(ARGS), CausalLMLoss()
        run = lambda: loss_fn(model(ids[:, :-1]), (ids[:, 1:], weights))  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return MICRO * SEQ / statistics.median(times[1:])


def deepy_tokens_per_sec(work: Path, name: str, steps: int, *extra: str) -> float:
    log_dir = work / name
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", "configs/llama3/tiny.yml", *SHAPE,
           f"data_path={work / 'data'}", f"train_iters={steps + 1}", f"log_dir={log_dir}", "save=null", "load=null", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_sec"] for r in records if "loss" in r and r["step"] > 1)


def write_random_corpus(prefix: Path) -> None:
    """400 documents of 100-2000 random ids of the benchmark vocabulary (the benchmarks' shared corpus)."""
    rng = np.random.RandomState(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(400):
            writer.add_document(rng.randint(0, ARGS.vocab_size, size=rng.randint(100, 2000)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_random_corpus(work / "data")
        bare = bare_step_tokens_per_sec(opts.steps)
        hf = bare_step_tokens_per_sec(opts.steps, hf=True)
        one = deepy_tokens_per_sec(work, "one", opts.steps, f"train_micro_batch_size_per_gpu={MICRO}",
                                   "gradient_accumulation_steps=2")
        pipe = deepy_tokens_per_sec(work, "pipe", opts.steps, "pipe_parallel_size=2", f"train_micro_batch_size_per_gpu={MICRO // 2}",
                                    "gradient_accumulation_steps=4")
    print(f"bare model step (ours)         {bare:8.0f} tok/s")
    print(f"transformers, same loop        {hf:8.0f} tok/s   ours / transformers {bare / hf:.2f}x")
    print(f"deepy.py, 1 rank (DeepSpeed)   {one:8.0f} tok/s   vs bare step {one / bare:.2f} (target >= 0.90)")
    print(f"deepy.py, pipeline 2 ranks     {pipe:8.0f} tok/s   vs 1 rank {pipe / one:.2f} (same global batch; < 2 = bubble + overhead)")


if __name__ == "__main__":
    main()
