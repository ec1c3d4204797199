"""A LoRA-DPO step over B pairs against a LoRA-SFT step over B records of the same length, through `deepy.py`.

    python -m benchmarks.preference_step [--steps 12] [--micro 4] [--precision fp32]

Shape: hidden 256, 4 layers, 4 heads, intermediate 768, the demo's 2048-token tokenizer (``tools/prepare_data.py``
is run if needed), seq 256; a random base imported from a transformers model. Every record and every answer fills
the window (Shakespeare text past 256 tokens, cut to it), so a pair is two records' worth of tokens. LoRA r 8 on
every linear layer, 1 rank. The arithmetic floor of the ratio is 3x: the pair's two sequences each go forward and
backward, and the reference (the base, adapters off) goes forward over both. Target: <= 3.3x. Printed: the median
step time of each (steps after the second) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.memory import make_base

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 768,
         "vocab_size": 2048}
LORA = ["lora_r=8", "lora_alpha=16", "lora_dropout=0", "lora_targets=[query,key,value,output,mlp]", "finetune=true",
        "data_path=null", "seq_length=256", "eval_iters=0", "log_interval=1", "num_workers=0",
        "tensorboard_dir=null", "peak_tflops=1", "prompt_style=alpaca", "checkpoint_factor=100000",
        "tokenizer_type=SPMTokenizer", "vocab_file=data/tokenizer/shakespeare_bpe.model"]


def texts(count: int) -> list[str]:
    """Slices of the Shakespeare corpus long enough to fill the window."""
    corpus = (ROOT / "data" / "shakespeare.jsonl").read_text(encoding="utf-8").splitlines()
    body = " ".join(json.loads(line)["text"] for line in corpus[:3])
    return [body[i * 4000:(i + 1) * 4000] for i in range(count)]


def run(work: Path, name: str, data: list[str], steps: int, micro: int, precision: str) -> float:
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", str(work / "base" / "model.yml"), *LORA, *data,
           f"load={work / 'base'}", f"save={work / name}", f"log_dir={work / name / 'logs'}", f"train_iters={steps}",
           f"train_micro_batch_size_per_gpu={micro}", f"precision={precision}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: deepy.py failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time"] for r in records if "loss" in r and r["step"] > 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro", type=int, default=4, help="records per SFT step = pairs per DPO step")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    if not (ROOT / "data" / "shakespeare.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "prepare_data.py")], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_base(work, "base", SHAPE)
        pieces = texts(3 * args.micro * args.steps)
        sft = [{"instruction": "Recite.", "input": "", "output": t} for t in pieces]
        pairs = [{"prompt": "Recite.", "chosen": a, "rejected": b} for a, b in zip(pieces[::2], pieces[1::2],
                                                                                strict=False)]
        (work / "sft.json").write_text(json.dumps(sft))
        (work / "pairs.json").write_text(json.dumps(pairs))
        sft_time = run(work, "sft", [f"sft_data_path={work / 'sft.json'}"], args.steps, args.micro, args.precision)
        dpo_time = run(work, "dpo", [f"preference_data_path={work / 'pairs.json'}", "preference_loss=dpo"],
                       args.steps, args.micro, args.precision)
    print(f"LoRA-SFT step over {args.micro} records: {sft_time:.3f} s; LoRA-DPO step over {args.micro} pairs: "
          f"{dpo_time:.3f} s; ratio {dpo_time / sft_time:.2f}x (floor 3x, target <= 3.3x)")


if __name__ == "__main__":
    main()
