"""Loss, perplexity and bits per byte of a checkpoint over documents, with Hugging Face's sliding window.

Each document is tokenised as one document (the start token once at its beginning, as preprocessing and
generation do) and scored in windows of ``seq_length`` every ``stride`` tokens, each window scoring only the
tokens the previous one did not. Bits per byte = total nats / ln 2 / UTF-8 bytes of the text: unlike perplexity
per token, it compares models with different tokenizers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from neox_llama.errors import NeoxLlamaError
from neox_llama.generation.language_model import LanguageModel, sliding_windows
from neox_llama.tokenizers.text import usable_text


class EvaluationError(NeoxLlamaError):
    """The text or dataset to evaluate cannot be read, or the settings do not fit the model."""


@dataclass
class PerplexityResult:
    """What ``tools/evaluate.py`` reports (and writes as JSON)."""

    loss: float
    """Mean negative log-likelihood per scored token, in nats."""
    perplexity: float
    bits_per_byte: float
    tokens: int
    """Scored tokens."""
    bytes: int
    """UTF-8 bytes of the whole text."""
    documents: int
    seq_length: int
    stride: int

    def summary(self) -> str:
        return (f"loss {self.loss:.4f} | perplexity {self.perplexity:.3f} | bits per byte {self.bits_per_byte:.4f} | "
                f"{self.tokens:,} tokens scored | {self.bytes:,} bytes | {self.documents} documents | "
                f"window {self.seq_length}, stride {self.stride}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def evaluate_documents(lm: LanguageModel, documents: Iterable[tuple[list[int], int]], seq_length: int, stride: int,
                       batch_size: int = 8, progress: bool = True, total: int | None = None) -> PerplexityResult:
    """Score ``documents`` ((token ids, UTF-8 bytes of the text) each) with sliding windows."""
    if seq_length > lm.max_length:
        raise EvaluationError(f"--seq-length {seq_length} exceeds the model's context of {lm.max_length} tokens")
    nats, tokens, size, count = 0.0, 0, 0, 0
    pending = []
    for ids, nbytes in tqdm(documents, total=total, unit="doc", disable=not progress, desc="evaluating"):
        size += nbytes
        count += 1
        pending += sliding_windows(ids, seq_length, stride)
        if len(pending) >= batch_size:
            got, n = lm.score_windows(pending, batch_size)
            nats, tokens, pending = nats + got, tokens + n, []
    got, n = lm.score_windows(pending, batch_size)
    nats, tokens = nats + got, tokens + n
    if tokens == 0:
        raise EvaluationError("nothing to score: the text has fewer than two tokens")
    loss = nats / tokens
    return PerplexityResult(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                            bits_per_byte=nats / math.log(2) / max(size, 1), tokens=tokens, bytes=size,
                            documents=count, seq_length=seq_length, stride=stride)


def text_documents(lm: LanguageModel, texts: Iterable[str]) -> Iterator[tuple[list[int], int]]:
    """Texts as documents: ids with the start-token policy, and their UTF-8 size (of the text as the tokenizer reads
    it: a lone surrogate counts as the U+FFFD it is encoded as, docs/tokenizers.md)."""
    for text in texts:
        text = usable_text(text)
        yield lm.tokenizer.encode_document(text), len(text.encode("utf-8"))


def read_text(path: str | Path) -> list[str]:
    try:
        return [Path(path).read_text(encoding="utf-8")]
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"--text {path}: cannot read it ({err})") from None


def read_jsonl(path: str | Path, keys: list[str]) -> Iterator[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"--jsonl {path}: cannot read it ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvaluationError(f"--jsonl {path}: line {number} is not valid JSON ({err.msg})") from None
        for key in keys:
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise EvaluationError(f"--jsonl {path}: line {number} has no string field {key!r}")
            yield value


def dataset_documents(lm: LanguageModel, prefix: str, first: int = 0, last: int | None = None):
    """Documents ``[first, last)`` of a .bin/.idx dataset as stored; bytes counted by decoding each one."""
    from neox_llama.data.indexed import IndexedDataset

    data = IndexedDataset(prefix)
    last = len(data) if last is None else last
    for index in range(first, last):
        ids = data.get(index).astype("int64").tolist()
        yield ids, len(lm.tokenizer.decode(ids).encode("utf-8"))


def test_split_sources(lm: LanguageModel) -> list[tuple[str, int, int | None]]:
    """The run's own test split: (dataset prefix, first document, last document) for each of its datasets."""
    from neox_llama.data.gpt_dataset import split_ranges
    from neox_llama.data.indexed import IndexedDataset

    cfg = lm.run.cfg
    if cfg.data_path:
        first, last = split_ranges(cfg.split, len(IndexedDataset(cfg.data_path)))[2]
        if last <= first:
            raise EvaluationError(f"{lm.run.folder}: the run's split {cfg.split} leaves no test documents of "
                                  f"{cfg.data_path}; give --data-path, --text or --jsonl")
        return [(cfg.data_path, first, last)]
    if cfg.test_data_paths:
        return [(p, 0, None) for p in cfg.test_data_paths]
    raise EvaluationError(f"{lm.run.folder}: the run has no test split (no data_path or test_data_paths); give "
                          "--data-path, --text or --jsonl")
