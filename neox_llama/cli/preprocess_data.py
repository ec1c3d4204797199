#!/usr/bin/env python
"""Tokenize a corpus into memory-mapped MMIDIDX datasets ({output_prefix}_{key}_document.{bin,idx}).

    python tools/preprocess_data.py --input data/a.jsonl,data/b.jsonl.gz --output-prefix data/corpus \\
        --tokenizer-type SPMTokenizer --vocab-file tokenizer.model --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from neox_llama.data.preprocess import output_prefix_for, preprocess
from neox_llama.errors import NeoxLlamaError
from neox_llama.tokenizers import TOKENIZER_TYPES
from neox_llama.utils.logging_setup import setup_logging


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="comma-separated .jsonl/.json/.txt files, optionally .gz/.zst")
    parser.add_argument("--output-prefix", required=True, help="datasets are written to PREFIX_{key}_document.{bin,idx}")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--vocab-file", required=True, help="tokenizer file (.model or tokenizer.json)")
    parser.add_argument("--jsonl-keys", nargs="+", default=["text"], help="JSON keys to tokenize, one dataset each")
    parser.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start each document with BOS (default: on for SPMTokenizer and Llama3Tokenizer, as Meta "
                             "trains them; --no-prepend-bos matches data made by GPT-NeoX)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--txt-split", choices=("file", "paragraph"), default="file",
                        help=".txt inputs: one document per file, or per blank-line-separated paragraph")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed record instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging("info")
    log = logging.getLogger("preprocess_data")
    inputs = [Path(p) for p in args.input.split(",") if p]
    try:
        summary = preprocess(inputs, args.output_prefix, args.tokenizer_type, args.vocab_file,
                             keys=tuple(args.jsonl_keys), append_eod=args.append_eod, workers=args.workers,
                             strict=args.strict, txt_split=args.txt_split, progress=not args.no_progress,
                             prepend_bos=args.prepend_bos)
    except NeoxLlamaError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output file was written", file=sys.stderr)
        return 130
    log.info("done: %s", summary.text())
    for key in args.jsonl_keys if not all(p.suffix == ".txt" for p in inputs) else ["text"]:
        log.info("wrote %s.{bin,idx}", output_prefix_for(args.output_prefix, key))
    return 0


def console_main() -> int:
    """The ``neox-*`` console script."""
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
