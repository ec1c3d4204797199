#!/usr/bin/env python
"""Merge LoRA checkpoints into their base: a full checkpoint that generate.py, convert_to_hf.py and training take.

    python tools/merge_lora.py --checkpoint runs/lora/global_step600 --output runs/merged [--base DIR] [--force]
    python tools/merge_lora.py --checkpoint A --weight 0.7 --checkpoint B --weight 0.3 --output runs/blend
    python tools/merge_lora.py --checkpoint runs/adapter_v2/global_step600 --output runs/merged_v2 --partial

Each --checkpoint is any step of a LoRA run (its settings and base are in its metadata). The base is the one
the first adapter names (--base: a new place for it); every adapter must have been trained on it (--force
accepts a base whose fingerprint differs; shapes are always checked). W + sum of weight x (alpha / r) B A,
one layer at a time (peak memory about one layer). A --weight must be a finite number within -10..10 (--force
goes beyond), and every merged tensor must come out finite; otherwise nothing is written. An Adapter v2
checkpoint merges only with --partial: its scales, biases and norms fold into the weights (W' = diag(s) W,
b' = s (b + bias)) and its learned prompt is dropped; an Adapter (v1) checkpoint is only a prompt and does not
merge.
"""

from __future__ import annotations

import argparse
import sys

from neox_llama.checkpoint.merge import Adapter, check_weight, merge_to_checkpoint
from neox_llama.cli.runner import command
from neox_llama.utils.logging_setup import setup_logging


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="ADAPTER_CHECKPOINT",
                        help="a LoRA (or Adapter v2) run's global_stepN / best (or its save directory: latest); "
                             "repeatable")
    parser.add_argument("--weight", action="append", type=float, metavar="W",
                        help="scale of the preceding --checkpoint's update (default 1; finite, within -10..10 unless "
                             "--force); give one per --checkpoint")
    parser.add_argument("--output", required=True, help="checkpoint folder to write (must not exist or be empty)")
    parser.add_argument("--base", help="the base checkpoint, when it is no longer where the adapter's metadata says")
    parser.add_argument("--force", action="store_true",
                        help="accept a base whose fingerprint differs, and a --weight beyond -10..10 (never NaN or "
                             "Inf)")
    parser.add_argument("--partial", action="store_true",
                        help="an Adapter v2 checkpoint: merge its scales, biases and norms, drop its learned prompt")
    args = parser.parse_args(argv)
    if args.weight is not None and len(args.weight) != len(args.checkpoint):
        parser.error(f"{len(args.checkpoint)} --checkpoint but {len(args.weight)} --weight; give a --weight after "
                     "every --checkpoint, or none")
    return args


@command("merge_lora.py")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging("info")
    weights = args.weight or [1.0] * len(args.checkpoint)
    for path, weight in zip(args.checkpoint, weights, strict=True):
        check_weight(weight, path, args.force)  # before any checkpoint is read or anything written
    adapters = [Adapter.open(path, weight) for path, weight in zip(args.checkpoint, weights, strict=True)]
    out = merge_to_checkpoint(adapters, args.output, base=args.base, force=args.force, partial=args.partial)
    print(f"wrote {out}")
    return 0


console_main = main  # neox-merge-lora


if __name__ == "__main__":
    sys.exit(main())
