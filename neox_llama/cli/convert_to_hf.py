#!/usr/bin/env python
"""Export a neox_llama checkpoint to a Hugging Face Llama directory (loads with transformers, offline).

    python tools/convert_to_hf.py --checkpoint runs/local/checkpoints --output runs/local/hf [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--force]

    python tools/convert_to_hf.py --checkpoint runs/lora/global_step600 --output runs/lora_peft --peft

--checkpoint is a save directory (its `latest` checkpoint is used) or one global_stepN folder. A LoRA checkpoint
exports as its base with the adapter merged, or with --peft as a PEFT adapter (adapter_config.json +
adapter_model.safetensors) for the base exported without it.
"""

from __future__ import annotations

import argparse
import sys

from neox_llama.cli.runner import command
from neox_llama.convert.hf_export import DEFAULT_SHARD_SIZE, export_to_hf
from neox_llama.convert.peft_export import export_peft
from neox_llama.utils.logging_setup import setup_logging


@command("convert_to_hf.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="save directory or global_stepN folder")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 (fp32 with --peft)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--base", help="a LoRA --checkpoint's base, when it is no longer where its metadata says")
    parser.add_argument("--peft", action="store_true", help="a LoRA or Adapter (v1, per-layer gate) checkpoint as a PEFT adapter "
                                                            "(default dtype fp32)")
    parser.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                        help=f"largest safetensors file, e.g. 5GB or 500MB (default {DEFAULT_SHARD_SIZE}); memory "
                             "while exporting is about one shard plus one layer")
    args = parser.parse_args(argv)
    args.dtype_set = args.dtype is not None
    args.dtype = args.dtype or "bf16"
    setup_logging("info")
    if args.peft:
        out = export_peft(args.checkpoint, args.output, args.dtype if args.dtype_set else "fp32", args.force, args.base)
    else:
        out = export_to_hf(args.checkpoint, args.output, args.dtype, args.force, args.base, args.max_shard_size)
    print(f"wrote {out}")
    return 0


console_main = main  # neox-convert-to-hf


if __name__ == "__main__":
    sys.exit(main())
