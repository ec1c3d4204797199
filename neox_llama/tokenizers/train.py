"""Train a small sentencepiece BPE with Llama-2's settings (as llama2.c does for custom vocabularies)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

LLAMA2_SETTINGS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "character_coverage": 1.0,
    "max_sentence_length": 16384,
}
"""Settings of Llama-2's tokenizer.model (byte fallback, split digits, no normalisation, bos 1 / eos 2)."""


def _texts(paths: list[Path], jsonl_key: str) -> Iterator[str]:
    for path in paths:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        text = json.loads(line).get(jsonl_key)
                        if isinstance(text, str):
                            yield from (t for t in text.split("\n") if t.strip())
        else:
            with open(path, encoding="utf-8") as handle:
                yield from (line.rstrip("\n") for line in handle if line.strip())


def train_sentencepiece(inputs: list[Path], output_prefix: str | os.PathLike, vocab_size: int, *,
                        jsonl_key: str = "text", threads: int | None = None) -> Path:
    """Train on the lines of ``inputs`` (.txt, or .jsonl values of ``jsonl_key``); returns the .model path."""
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + ".partial")
    spm.SentencePieceTrainer.train(sentence_iterator=_texts(inputs, jsonl_key), model_prefix=str(tmp),
                                   vocab_size=vocab_size, num_threads=threads or os.cpu_count() or 1,
                                   minloglevel=2, **LLAMA2_SETTINGS)
    for ext in (".model", ".vocab"):
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")
    return Path(f"{prefix}.model")
