#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer with Llama-2's settings on text files.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --output-prefix data/tokenizer/shakespeare_bpe --vocab-size 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neox_llama.cli.runner import command
from neox_llama.errors import NeoxLlamaError


@command("train_tokenizer.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="comma-separated .txt or .jsonl files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--jsonl-key", default="text")
    args = parser.parse_args(argv)
    inputs = [Path(p) for p in args.input.split(",") if p]
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise NeoxLlamaError(f"input not found: {', '.join(missing)}")
    if args.vocab_size < 260:
        raise NeoxLlamaError("--vocab-size must be at least 260 (256 byte pieces + specials)")
    from neox_llama.tokenizers.train import train_sentencepiece

    try:
        model = train_sentencepiece(inputs, args.output_prefix, args.vocab_size, jsonl_key=args.jsonl_key)
    except RuntimeError as err:
        raise NeoxLlamaError(f"sentencepiece could not train: {err}") from None
    print(f"wrote {model} (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
