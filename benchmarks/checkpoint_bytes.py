"""Bytes per parameter of a checkpoint, by part, for an fp32 and a bf16 run (1 rank, `deepy.py train.py`).

    python -m benchmarks.checkpoint_bytes [--shape hidden,layers]

Shape: the tiny preset widened to hidden 512, 4 layers, intermediate 1536, vocab 4096 (~16 M parameters, so that
file headers do not count), one step, saved. Parts: ``weights/`` (the layout-free fp32 masters), ``optimizer/``
(each trained tensor's Adam moments), DeepSpeed's own engine files (``*.pt`` beside them; none since 2026-12-07,
except for fp16 at ZeRO stage 0), and the rest (rng, config, metadata). Run it in a checkout of an older commit to
compare (the numbers of one run before the layout-free optimizer state are in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open

from neox_llama.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096


def _corpus(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(folder / "corpus", np.uint16) as writer:
        for _ in range(64):
            writer.add_document(rng.integers(1, VOCAB, 300).tolist())
    return folder / "corpus"


def _parameters(weights: Path) -> int:
    total = 0
    for path in weights.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                total += int(np.prod(handle.get_slice(name).get_shape()))
    return total


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def measure(precision: str, hidden: int, layers: int, folder: Path) -> dict:
    run = folder / precision
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", str(ROOT / "configs/llama3/tiny.yml"),
           f"hidden_size={hidden}", f"num_layers={layers}", f"intermediate_size={3 * hidden}", "num_attention_heads=8",
           "num_kv_heads=8", f"vocab_size={VOCAB}", "tokenizer_type=null", "vocab_file=null", "seq_length=64",
           "train_micro_batch_size_per_gpu=2", "train_iters=1", "checkpoint_factor=1", "eval_interval=1000",
           f"precision={precision}", f"data_path={_corpus(folder)}", f"save={run / 'ck'}", f"load={run / 'ck'}",
           f"log_dir={run / 'logs'}", "tensorboard_dir=null", "peak_tflops=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    checkpoint = run / "ck" / "global_step1"
    params = _parameters(checkpoint / "weights")
    everything = [p for p in checkpoint.rglob("*") if p.is_file()]
    parts = {"weights": _size((checkpoint / "weights").glob("*")),
             "optimizer": _size((checkpoint / "optimizer").glob("*")),
             "deepspeed": _size(p for p in everything if p.suffix == ".pt" and p.parent == checkpoint)}
    parts["other"] = _size(everything) - sum(parts.values())
    return {"precision": precision, "parameters": params,
            **{f"{k}_bytes_per_param": v / params for k, v in parts.items()},
            "total_bytes_per_param": _size(everything) / params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,4", help="hidden,layers")
    args = parser.parse_args()
    hidden, layers = map(int, args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            result = measure(precision, hidden, layers, Path(tmp) / precision)
            print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
