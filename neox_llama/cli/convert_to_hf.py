#!/usr/bin/env python
"""Export a neox_llama checkpoint to a Hugging Face Llama directory (loads with transformers, offline).

    python tools/convert_to_hf.py --checkpoint runs/local/checkpoints --output runs/local/hf [--dtype bf16|fp16|fp32] [--force]

--checkpoint is a save directory (its `latest` checkpoint is used) or one global_stepN folder.
"""

from __future__ import annotations

import argparse
import sys

from neox_llama.convert.hf_export import export_to_hf
from neox_llama.errors import NeoxLlamaError
from neox_llama.utils.logging_setup import setup_logging


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="save directory or global_stepN folder")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    setup_logging("info")
    try:
        out = export_to_hf(args.checkpoint, args.output, args.dtype, args.force)
    except NeoxLlamaError as err:
        print(f"convert_to_hf.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def console_main() -> int:
    """The ``neox-*`` console script."""
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
