"""Train a small sentencepiece BPE with Llama-2's settings (as llama2.c does for custom vocabularies)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from neox_llama.tokenizers.text import undecodable_reason, unencodable_reason

logger = logging.getLogger(__name__)

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


def _line_texts(path: Path, line: str, jsonl_key: str) -> list[str] | str:
    """The texts of one line, or why the line is skipped (text no tokenizer can encode, as preprocessing skips it)."""
    bad = undecodable_reason(line, "utf-8")
    if bad:
        return bad
    if path.suffix != ".jsonl":
        return [line.rstrip("\n")]
    try:
        text = json.loads(line).get(jsonl_key)
    except (json.JSONDecodeError, AttributeError):
        return "not a JSON object"
    if not isinstance(text, str):
        return []
    bad = unencodable_reason(text)
    return f"the value of {jsonl_key!r} holds {bad}" if bad else [t for t in text.split("\n") if t.strip()]


def _texts(paths: list[Path], jsonl_key: str, skipped: list[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                texts = _line_texts(path, line, jsonl_key)
                if isinstance(texts, str):
                    skipped.append(f"{path}:{number}: {texts}")
                    if len(skipped) <= 5:
                        logger.warning("skipping %s", skipped[-1])
                    continue
                yield from texts


def train_sentencepiece(inputs: list[Path], output_prefix: str | os.PathLike, vocab_size: int, *,
                        jsonl_key: str = "text", threads: int | None = None) -> Path:
    """Train on the lines of ``inputs`` (UTF-8 .txt, or .jsonl values of ``jsonl_key``); returns the .model path.
    A line that is not valid UTF-8, holds text no tokenizer can encode or is not a JSON object is skipped and
    logged (the first five, then a count)."""
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + ".partial")
    skipped: list[str] = []
    spm.SentencePieceTrainer.train(sentence_iterator=_texts(inputs, jsonl_key, skipped), model_prefix=str(tmp),
                                   vocab_size=vocab_size, num_threads=threads or os.cpu_count() or 1,
                                   minloglevel=2, **LLAMA2_SETTINGS)
    if skipped:
        logger.warning("%d line(s) skipped: not valid UTF-8 text, text no tokenizer can encode, or not JSON objects",
                       len(skipped))
    for ext in (".model", ".vocab"):
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")
    return Path(f"{prefix}.model")
