"""A LoRA-DPO step over B pairs against a LoRA-SFT step over B records of the same length, through `deepy.py`;
a DPO step with precomputed reference log-probabilities against one with the reference model; and full-model DPO's
reference copy per rank under ZeRO-3.

    python -m benchmarks.preference_step [--steps 12] [--micro 4] [--precision fp32] [--skip-zero3]

Shape: hidden 256, 4 layers, 4 heads, intermediate 768, the demo's 2048-token tokenizer (``tools/prepare_data.py``
is run if needed), seq 256; a random base imported from a transformers model. Every record and every answer fills
the window (Shakespeare text past 256 tokens, cut to it), so a pair is two records' worth of tokens. LoRA r 8 on
every linear layer, 1 rank. The arithmetic floor of the ratio is 3x: the pair's two sequences each go forward and
backward, and the reference (the base, adapters off) goes forward over both. Target: <= 3.3x. Printed: the median
step time of each (steps after the second) and their ratio.

Precomputed references (``preference_reference: precomputed``): the same LoRA-DPO run with the reference's
log-probabilities computed before training; its step against the model-reference step, target <= 0.7x.

ZeRO-3: full-model DPO on 2 ranks (hidden 1024, 8 layers, 16 heads, fp32, micro 1, seq 256), the reference copy
partitioned like the policy, against the same run with precomputed references (no copy): rank 0's peak RSS of each
and the dry run's estimate of the copy per rank.
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


BIG = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "intermediate_size": 2816,
       "vocab_size": 2048}


def run(work: Path, name: str, data: list[str], steps: int, micro: int, precision: str, *extra: str,
        base: str = "base", keys: list[str] = LORA) -> tuple[float, float]:
    """The median step time (steps after the second) and rank 0's peak RSS in MiB."""
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", str(work / base / "model.yml"), *keys, *data,
           f"load={work / base}", f"save={work / name}", f"log_dir={work / name / 'logs'}", f"train_iters={steps}",
           f"train_micro_batch_size_per_gpu={micro}", f"precision={precision}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: deepy.py failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps_after = [r for r in records if "loss" in r and r["step"] > 2]
    return statistics.median(r["step_time"] for r in steps_after), max(r["peak_memory_mb"] for r in steps_after)


def zero3_reference(work: Path, pairs: Path, precision: str) -> None:
    """Full-model DPO under ZeRO-3 on 2 ranks: with the partitioned reference copy and with precomputed values."""
    from neox_llama.config import load_config
    from neox_llama.planning.memory import estimate_memory

    make_base(work, "big", BIG)
    keys = [k for k in LORA if not k.startswith(("lora", "finetune"))] + [
        "finetune=true", "num_gpus=2", "zero_optimization.stage=3", "optimizer.params.lr=1e-5"]
    data = [f"preference_data_path={pairs}", "preference_loss=dpo"]
    model = run(work, "full-model", data, 5, 1, precision, base="big", keys=keys)
    pre = run(work, "full-pre", data, 5, 1, precision, "preference_reference=precomputed", base="big", keys=keys)
    cfg = load_config([work / "big" / "model.yml"], [*keys, *data, f"load={work / 'big'}", "vocab_size=null",
                                                      f"precision={precision}", "train_micro_batch_size_per_gpu=1"],
                      world_size=2, tokenizer_vocab=2048)
    estimate = estimate_memory(cfg)
    print(f"ZeRO-3, 2 ranks, full-model DPO ({estimate.parameters:,} parameters, {precision}): rank 0 peak RSS "
          f"{model[1]:.0f} MiB with the reference copy, {pre[1]:.0f} MiB with precomputed references "
          f"(difference {model[1] - pre[1]:.0f} MiB; the dry run's copy per rank {estimate.reference / 2**20:.0f} "
          f"MiB); step {model[0]:.3f} s vs {pre[0]:.3f} s ({pre[0] / model[0]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro", type=int, default=4, help="records per SFT step = pairs per DPO step")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--skip-zero3", action="store_true", help="leave out the 2-rank ZeRO-3 memory comparison")
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
        sft_time, _ = run(work, "sft", [f"sft_data_path={work / 'sft.json'}"], args.steps, args.micro,
                          args.precision)
        dpo = [f"preference_data_path={work / 'pairs.json'}", "preference_loss=dpo"]
        dpo_time, _ = run(work, "dpo", dpo, args.steps, args.micro, args.precision)
        pre_time, _ = run(work, "dpo-pre", dpo, args.steps, args.micro, args.precision,
                          "preference_reference=precomputed")
        print(f"LoRA-SFT step over {args.micro} records: {sft_time:.3f} s; LoRA-DPO step over {args.micro} pairs: "
              f"{dpo_time:.3f} s; ratio {dpo_time / sft_time:.2f}x (floor 3x, target <= 3.3x)")
        print(f"LoRA-DPO step with precomputed reference log-probabilities: {pre_time:.3f} s; "
              f"{pre_time / dpo_time:.2f}x the model-reference step (target <= 0.7x)")
        if not args.skip_zero3:
            zero3_reference(work, work / "pairs.json", args.precision)


if __name__ == "__main__":
    main()
