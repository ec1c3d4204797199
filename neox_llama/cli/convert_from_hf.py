#!/usr/bin/env python
"""Convert a local Hugging Face Llama directory into a neox_llama checkpoint for fine-tuning, or a PEFT LoRA adapter
into a neox_llama LoRA checkpoint on a base checkpoint.

    python tools/convert_from_hf.py --hf path/to/Llama-3.2-1B --output checkpoints/llama32-1b \\
        [--pipe-parallel-size N] [--model-parallel-size M] [--force]
    python tools/convert_from_hf.py --peft path/to/peft-adapter --base checkpoints/llama32-1b \\
        --output checkpoints/llama32-1b-lora [--force]

Then: python deepy.py train.py checkpoints/llama32-1b/model.yml configs/local.yml; an imported adapter goes where a
LoRA checkpoint goes (generate.py --adapter, serve.py --adapter, merge_lora.py, evaluate.py --adapter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neox_llama.cli.runner import command
from neox_llama.convert.hf_import import import_from_hf
from neox_llama.convert.peft_import import import_peft
from neox_llama.utils.logging_setup import setup_logging


@command("convert_from_hf.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face model directory (config.json + weights)")
    source.add_argument("--peft", metavar="ADAPTER_DIR",
                        help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), e.g. "
                             "trained with peft on convert_to_hf.py's export of --base; writes a LoRA checkpoint")
    parser.add_argument("--base", metavar="CHECKPOINT",
                        help="with --peft: the neox_llama checkpoint the adapter was trained on (its fingerprint is "
                             "recorded; the tensor shapes must match it)")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--pipe-parallel-size", type=int, default=1)
    parser.add_argument("--model-parallel-size", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    setup_logging("info")
    if args.peft is not None:
        if args.base is None:
            parser.error("--peft needs --base CHECKPOINT (the base checkpoint the adapter applies to)")
        if args.pipe_parallel_size != 1 or args.model_parallel_size != 1:
            parser.error("--peft writes a layout-free LoRA checkpoint; drop --pipe-parallel-size/--model-parallel-size")
        folder = import_peft(args.peft, args.base, args.output, args.force)
        print(f"wrote {folder} (a LoRA checkpoint: python tools/generate.py --checkpoint {args.base} --adapter {folder} ..., "
              "merge_lora.py, serve.py --adapter)")
        return 0
    if args.base is not None:
        parser.error("--base goes with --peft")
    folder = import_from_hf(args.hf, args.output, args.pipe_parallel_size, args.model_parallel_size, args.force)
    print(f"wrote {folder} (fine-tune with: python deepy.py train.py {Path(args.output) / 'model.yml'} configs/local.yml)")
    return 0


console_main = main  # neox-convert-from-hf


if __name__ == "__main__":
    sys.exit(main())
