#!/usr/bin/env python
"""Convert a local Hugging Face Llama directory into a neox_llama checkpoint for fine-tuning.

    python tools/convert_from_hf.py --hf path/to/Llama-3.2-1B --output checkpoints/llama32-1b \\
        [--pipe-parallel-size N] [--model-parallel-size M] [--force]

Then: python deepy.py train.py checkpoints/llama32-1b/model.yml configs/local.yml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neox_llama.cli.runner import command
from neox_llama.convert.hf_import import import_from_hf
from neox_llama.utils.logging_setup import setup_logging


@command("convert_from_hf.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + weights)")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--pipe-parallel-size", type=int, default=1)
    parser.add_argument("--model-parallel-size", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    setup_logging("info")
    folder = import_from_hf(args.hf, args.output, args.pipe_parallel_size, args.model_parallel_size, args.force)
    print(f"wrote {folder} (fine-tune with: python deepy.py train.py {Path(args.output) / 'model.yml'} configs/local.yml)")
    return 0


console_main = main  # neox-convert-from-hf


if __name__ == "__main__":
    sys.exit(main())
