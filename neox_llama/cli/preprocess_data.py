#!/usr/bin/env python
"""Tokenize a corpus into memory-mapped MMIDIDX datasets ({output_prefix}_{key}_document.{bin,idx}).

    python tools/preprocess_data.py --input data/a.jsonl,data/b.jsonl.gz --output-prefix data/corpus \\
        --tokenizer-type SPMTokenizer --vocab-file tokenizer.model --append-eod --workers 2
    python tools/preprocess_data.py --input path/to/corpus.parquet --jsonl-keys text --output-prefix data/corpus \\
        --tokenizer-type SPMTokenizer --vocab-file tokenizer.model --append-eod
    python tools/preprocess_data.py --instruction --input data/alpaca.json --output-prefix data/sft \
        --tokenizer-type SPMTokenizer --vocab-file tokenizer.model [--prompt-style alpaca] [--no-mask-prompt]

--instruction reads JSON/JSONL instruction records (Alpaca or chat) and writes PREFIX_text_document and the
parallel PREFIX_label_document (GPT-NeoX's format: int32, -100 where there is no loss), for
train_data_paths + train_label_data_paths.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from neox_llama.cli.runner import command
from neox_llama.data.preprocess import output_prefix_for, preprocess
from neox_llama.tokenizers import TOKENIZER_TYPES
from neox_llama.tokenizers.prompts import STYLES
from neox_llama.utils.logging_setup import setup_logging


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True,
                        help="comma-separated .jsonl/.json/.txt files (optionally .gz/.zst), .parquet files (read a "
                             "batch of rows at a time), or folders saved by datasets' save_to_disk")
    parser.add_argument("--output-prefix", required=True, help="datasets are written to PREFIX_{key}_document.{bin,idx}")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--vocab-file", required=True, help="tokenizer file (.model or tokenizer.json)")
    parser.add_argument("--jsonl-keys", nargs="+", default=["text"],
                        help="JSON keys (parquet/datasets: text columns) to tokenize, one dataset each")
    parser.add_argument("--split", default="train",
                        help="a save_to_disk folder holding a DatasetDict: the split to read (default train)")
    parser.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start each document with BOS (default: on for SPMTokenizer and Llama3Tokenizer, as Meta "
                             "trains them; --no-prepend-bos matches data made by GPT-NeoX)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--txt-split", choices=("file", "paragraph"), default="file",
                        help=".txt inputs: one document per file, or per blank-line-separated paragraph")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed record instead of skipping it")
    parser.add_argument("--encoding", default="utf-8",
                        help="text encoding of the inputs (default utf-8; e.g. latin-1 or cp1252 for older corpora): "
                             "a line that is not valid text in it is a malformed record, skipped with its file and line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--instruction", action="store_true",
                        help="instruction records -> PREFIX_text_document + PREFIX_label_document")
    parser.add_argument("--prompt-style", choices=STYLES, help="--instruction: the template (default: alpaca for "
                                                               "Alpaca records, the family's chat style for chat)")
    parser.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="--instruction: labels only on response tokens (default on)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


@command("preprocess_data.py", interrupted="interrupted; no output file was written")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging("info")
    log = logging.getLogger("preprocess_data")
    inputs = [Path(p) for p in args.input.split(",") if p]
    if args.instruction:
        return _instruction(args, inputs)
    summary = preprocess(inputs, args.output_prefix, args.tokenizer_type, args.vocab_file, keys=tuple(args.jsonl_keys),
                         append_eod=args.append_eod, workers=args.workers, strict=args.strict,
                         txt_split=args.txt_split, progress=not args.no_progress, prepend_bos=args.prepend_bos,
                         encoding=args.encoding, split=args.split)
    log.info("done: %s", summary.text())
    for key in args.jsonl_keys if not all(p.suffix == ".txt" for p in inputs) else ["text"]:
        log.info("wrote %s.{bin,idx}", output_prefix_for(args.output_prefix, key))
    return 0


def _instruction(args: argparse.Namespace, inputs: list[Path]) -> int:
    from neox_llama.data.columnar import DATASET_FOLDER, PARQUET, input_kind
    from neox_llama.data.instruction import write_label_datasets
    from neox_llama.data.readers import PreprocessError, check_encoding
    from neox_llama.tokenizers import build_tokenizer

    check_encoding(args.encoding)
    for path in inputs:
        if input_kind(path) in (PARQUET, DATASET_FOLDER):
            raise PreprocessError(f"{path}: --instruction reads .json/.jsonl instruction records; parquet and "
                                  "datasets folders are read as plain corpora only (without --instruction)")
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file)
    text, labels, records, tokens = write_label_datasets(inputs, args.output_prefix, tokenizer, args.prompt_style,
                                                         args.mask_prompt, encoding=args.encoding)
    logging.getLogger("preprocess_data").info("wrote %s.{bin,idx} and %s.{bin,idx}: %d records, %d tokens", text,
                                              labels, records, tokens)
    return 0


console_main = main  # neox-preprocess


if __name__ == "__main__":
    sys.exit(main())
