"""Host memory per rank at scale: construction, the first step and a checkpoint save of a ~0.75 B model through
`deepy.py train.py`, at 1 rank, ZeRO-3 on 2 ranks, a 2-stage pipeline and 2-way tensor parallelism.

    python -m benchmarks.memory [--cases one,zero3,pp2,tp2,lora]

Shape: hidden 2048, 12 layers, 16 heads, intermediate 5632, vocab 32000 (753 M parameters), seq 256, micro
batch 1, bf16, ZeRO 1 unless the case says otherwise. Every rank's resident memory (RSS) is sampled from outside
every 0.1 s with psutil; phases are cut at the run's own log lines (construction until "built the model", the
engine and data set-up until "training ... steps", the step until its log line, the save until "saved
checkpoint"). Printed per case and rank: the peak of
each phase, the largest peak against the 1-rank run's, and the construction peak against one fp32 copy of the
model (3.0 GB). Targets: ZeRO-3 / pp 2 / tp 2 peak per rank <= 0.6 x the 1-rank peak; under ZeRO-3 no rank holds
a full fp32 copy of the model while building it.

The ``lora`` case fine-tunes LoRA adapters (r 8 on every linear layer, configs/finetune/lora.yml) on a 551 M
base (hidden 1536, 16 layers, 12 heads, intermediate 4096, vocab 32000) loaded from its checkpoint, at 1 rank
and under ZeRO-3 on 4 ranks, and the same two runs on a tiny model, whose peaks (the framework's own cost per
rank) are subtracted. Targets: ZeRO-3 per rank <= 0.6 x the 1-rank figure and < 0.75 x one fp32 copy (2.2 GB).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from neox_llama.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["num_layers=12", "hidden_size=2048", "num_attention_heads=16", "num_kv_heads=16", "intermediate_size=5632",
         "vocab_size=32000", "make_vocab_size_divisible_by=128", "seq_length=256", "max_position_embeddings=256",
         "tokenizer_type=null", "vocab_file=null", "precision=bf16", "train_micro_batch_size_per_gpu=1",
         "gradient_accumulation_steps=1", "train_batch_size=null", "train_iters=1", "checkpoint_factor=1",
         "eval_iters=0", "log_interval=1", "num_workers=0", "tensorboard_dir=null", "split=100,0,0",
         "peak_tflops=1.0"]
CASES = {
    "one": ["zero_optimization.stage=1"],
    "zero3": ["num_gpus=2", "zero_optimization.stage=3", "zero_optimization.stage3_prefetch_bucket_size=0",
              "zero_optimization.stage3_max_reuse_distance=0"],
    "pp2": ["pipe_parallel_size=2", "zero_optimization.stage=1"],
    "tp2": ["model_parallel_size=2", "zero_optimization.stage=1"],
}
LORA_SHAPE = {"hidden_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 12, "intermediate_size": 4096,
              "vocab_size": 32000}
"""The LoRA case's base: 551 M parameters (2.2 GB in float32)."""
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192,
              "vocab_size": 32000}
"""The same run on a tiny model: what the framework itself costs per rank (subtracted)."""
LORA_RUN = ["sft_data_path=null", "precision=bf16", "seq_length=256", "train_micro_batch_size_per_gpu=1",
            "gradient_accumulation_steps=1", "train_batch_size=null", "train_iters=1", "checkpoint_factor=1",
            "eval_iters=0", "save_best=false", "log_interval=1", "num_workers=0", "tensorboard_dir=null",
            "split=100,0,0", "peak_tflops=1.0", "zero_optimization.stage=1"]
LORA_CASES = ("lora-one", "lora-zero3", "lora-tiny-one", "lora-tiny-zero3")
FP32_LORA_MODEL = 551_000_000 * 4
PHASES = ("construction", "engine", "step", "save")
MARKS = {"construction": "built the model on this rank", "engine": "INFO train: training ",
         "step": "INFO train: step ", "save": "saved checkpoint"}
FP32_MODEL = 753_000_000 * 4


def write_corpus(prefix: Path) -> None:
    rng = np.random.RandomState(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(64):
            writer.add_document(rng.randint(0, 32000, size=600))


def _ranks(root: psutil.Process) -> dict[int, psutil.Process]:
    """The launched training processes under ``root``, by their RANK."""
    found = {}
    for proc in [root, *root.children(recursive=True)]:  # one rank may run in deepy's own process
        try:
            if "train.py" in " ".join(proc.cmdline()) and "--config" in proc.cmdline():
                found[int(proc.environ().get("RANK", "0"))] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def pretraining_command(work: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "deepy.py"), "train.py", "configs/llama3/tiny.yml", *SHAPE,
            f"data_path={work / 'data'}", f"save={work / name}", f"log_dir={work / name / 'logs'}", *CASES[name]]


def make_base(work: Path, name: str, shape: dict) -> Path:
    """A base checkpoint of ``shape`` with random weights: a transformers model, saved and imported by the
    project's own converter (streamed one layer at a time). Returns the import's model.yml."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neox_llama.convert.hf_import import import_from_hf

    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=256,
                         rope_theta=500000.0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(work / f"{name}-hf")
    import_from_hf(work / f"{name}-hf", work / name)
    shutil.rmtree(work / f"{name}-hf")
    return work / name / "model.yml"


def lora_command(work: Path, name: str) -> list[str]:
    base = "lora-tiny-base" if "tiny" in name else "lora-base"
    layout = ["num_gpus=4", "zero_optimization.stage=3", "zero_optimization.stage3_prefetch_bucket_size=0",
              "zero_optimization.stage3_max_reuse_distance=0"] if name.endswith("zero3") else []
    return [sys.executable, str(ROOT / "deepy.py"), "train.py", str(work / base / "model.yml"),
            "configs/finetune/lora.yml", *LORA_RUN, f"data_path={work / 'data'}", f"load={work / base}",
            f"save={work / name}", f"log_dir={work / name / 'logs'}", *layout]


def run_case(work: Path, name: str) -> dict[int, dict[str, float]]:
    """Peak RSS (bytes) per rank and phase."""
    cmd = lora_command(work, name) if name in LORA_CASES else pretraining_command(work, name)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phase = {"now": "construction"}
    log: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            log.append(line)
            for p, mark in MARKS.items():
                if mark in line:
                    phase["now"] = PHASES[min(PHASES.index(p) + 1, len(PHASES) - 1)]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peaks: dict[int, dict[str, float]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        for rank, p in _ranks(root).items():
            try:
                rss = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            slot = peaks.setdefault(rank, dict.fromkeys(PHASES, 0.0))
            slot[phase["now"]] = max(slot[phase["now"]], rss)
        time.sleep(0.1)
    reader.join(5)
    if proc.returncode:
        raise SystemExit(f"{name}: deepy.py failed:\n{''.join(log[-40:])}")
    return peaks


def lora_report(results: dict) -> None:
    """The LoRA case: each rank's peak above the tiny run's (same layout), against the 1-rank figure and fp32 copy."""
    def peak(name: str, rank: int) -> float:
        return max(results[name][rank].values())

    one = peak("lora-one", 0) - peak("lora-tiny-one", 0)
    print("LoRA fine-tune of a 551 M base (ZeRO-3 on 4 ranks vs 1 rank), peak RSS above the tiny model's run:")
    print("case        rank  construction GB  engine GB  step GB  save GB  above tiny GB  / 1 rank  / fp32 model")
    for name in ("lora-one", "lora-zero3"):
        for rank, p in sorted(results[name].items()):
            above = peak(name, rank) - peak(name.replace("lora-", "lora-tiny-"), rank)
            print(f"{name:10s} {rank:5d}  {p['construction'] / 1e9:15.2f}  {p['engine'] / 1e9:9.2f}  "
                  f"{p['step'] / 1e9:7.2f}  {p['save'] / 1e9:7.2f}  {above / 1e9:13.2f}  {above / one:8.2f}  "
                  f"{above / FP32_LORA_MODEL:11.2f}")
    print("targets: lora-zero3 per rank <= 0.6 x lora-one and < 0.75 x one fp32 copy of the model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}, and lora (the LoRA case)")
    opts = parser.parse_args()
    names = opts.cases.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_corpus(work / "data")
        if "lora" in names:
            make_base(work, "lora-base", LORA_SHAPE)
            make_base(work, "lora-tiny-base", TINY_SHAPE)
            names = [n for n in names if n != "lora"] + list(LORA_CASES)
        for name in names:
            results[name] = run_case(work, name)
            print(f"{name}: done", flush=True)
    pretraining = {n: r for n, r in results.items() if n in CASES}
    if pretraining:
        one = max(max(p.values()) for p in results["one"].values()) if "one" in results else None
        print("case    rank  construction GB  engine GB  step GB  save GB  peak / 1 rank  build / fp32 model")
        for name, ranks in pretraining.items():
            for rank, p in sorted(ranks.items()):
                peak = max(p.values())
                ratio = f"{peak / one:13.2f}" if one else " " * 13
                print(f"{name:7s} {rank:4d}  {p['construction'] / 1e9:15.2f}  {p['engine'] / 1e9:9.2f}  "
                      f"{p['step'] / 1e9:7.2f}  {p['save'] / 1e9:7.2f}  {ratio}  {p['construction'] / FP32_MODEL:18.2f}")
        print("targets: zero3 / pp2 / tp2 peak per rank <= 0.6 x one rank; zero3 builds below one fp32 copy (1.00)")
    if "lora-one" in results:
        lora_report(results)


if __name__ == "__main__":
    main()
