"""Corpus files -> tokenized MMIDIDX datasets (the library behind tools/preprocess_data.py).

Inputs: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.txt`` (one document
per file, or per blank-line-separated paragraph), each optionally compressed (``.gz``, ``.zst``).
One dataset is written per JSON key: ``{output_prefix}_{key}_document.{bin,idx}`` (``text`` for .txt).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from neox_llama.data.indexed import IndexedDatasetWriter, token_dtype
from neox_llama.tokenizers import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

BATCH_DOCS = 128


class PreprocessError(Exception):
    """Bad input (with --strict) or an unreadable file; the message names file and line."""


@dataclass
class Document:
    source: str
    """``file:line`` (or ``file:item N`` for a .json list)."""
    texts: dict[str, str]


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    skipped: list[str] = field(default_factory=list)
    empty: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"{self.documents:,} documents, {self.tokens:,} tokens ({rate:,.0f} tokens/s, {self.seconds:.1f} s); "
                f"{len(self.skipped)} malformed record(s) skipped, {self.empty} empty document(s) skipped")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")  # noqa: SIM115
    return open(path, encoding="utf-8")  # noqa: SIM115


def _kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".zst")]
    kind = suffixes[-1] if suffixes else ""
    if kind not in (".jsonl", ".json", ".txt"):
        raise PreprocessError(f"{path}: unsupported input type; use .jsonl, .json or .txt (optionally .gz/.zst)")
    return kind


def read_documents(paths: list[Path], keys: list[str], txt_split: str, report) -> Iterator[Document]:
    """Documents of every input in order; malformed records go to ``report(location, reason)``."""
    for path in paths:
        if not path.is_file():
            raise PreprocessError(f"{path}: input file not found")
        kind = _kind(path)
        with _open_text(path) as handle:
            if kind == ".txt":
                text = handle.read()
                if txt_split == "file":
                    yield Document(f"{path}", {"text": text})
                else:
                    for n, block in enumerate(b for b in text.split("\n\n") if b.strip()):
                        yield Document(f"{path}:paragraph {n + 1}", {"text": block})
            elif kind == ".jsonl":
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    doc = _from_json(line, f"{path}:{number}", keys, report)
                    if doc:
                        yield doc
            else:
                try:
                    items = json.load(handle)
                except json.JSONDecodeError as err:
                    raise PreprocessError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(items, list):
                    raise PreprocessError(f"{path}: a .json input must hold a list of objects")
                for n, item in enumerate(items):
                    doc = _from_json(item, f"{path}:item {n}", keys, report)
                    if doc:
                        yield doc


def _from_json(record, where: str, keys: list[str], report) -> Document | None:
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as err:
            report(where, f"not valid JSON ({err.msg})")
            return None
    if not isinstance(record, dict):
        report(where, f"expected a JSON object, got {type(record).__name__}")
        return None
    missing = [k for k in keys if not isinstance(record.get(k), str)]
    if missing:
        report(where, f"no string value for key(s) {', '.join(missing)}")
        return None
    return Document(where, {k: record[k] for k in keys})


_WORKER: dict = {}


def _init_worker(tokenizer_type: str, vocab_file: str) -> None:
    _WORKER["tok"] = build_tokenizer(tokenizer_type, vocab_file)


def _encode_batch(batch: tuple[list[str], list[list[str]], bool]) -> list[list[list[int]]]:
    keys, texts_per_key, append_eod = batch
    tok: Tokenizer = _WORKER["tok"]
    per_key = [tok.encode_batch(texts) for texts in texts_per_key]
    if append_eod:
        for ids_list in per_key:
            for ids in ids_list:
                ids.append(tok.eod_id)
    return per_key


def _batches(docs: Iterator[Document], keys: list[str], append_eod: bool, summary: Summary):
    batch: list[Document] = []
    for doc in docs:
        summary.bytes_read += sum(len(t) for t in doc.texts.values())
        if not any(doc.texts[k].strip() for k in keys):
            summary.empty += 1
            continue
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            yield keys, [[d.texts[k] for d in batch] for k in keys], append_eod
            batch = []
    if batch:
        yield keys, [[d.texts[k] for d in batch] for k in keys], append_eod


def output_prefix_for(output_prefix: str, key: str) -> str:
    """The dataset prefix written for one JSON key (the contract: ``{prefix}_{key}_document``)."""
    return f"{output_prefix}_{key}_document"


def preprocess(inputs: list[Path], output_prefix: str, tokenizer_type: str, vocab_file: str, *,
               keys: tuple[str, ...] = ("text",), append_eod: bool = False, workers: int = 1,
               strict: bool = False, txt_split: str = "file", progress: bool = True) -> Summary:
    """Tokenize ``inputs`` into one dataset per key; returns what was done."""
    tokenizer = build_tokenizer(tokenizer_type, vocab_file)
    keys = list(keys) if not all(_kind(p) == ".txt" for p in inputs) else ["text"]
    summary = Summary()

    def report(where: str, reason: str) -> None:
        if strict:
            raise PreprocessError(f"{where}: {reason} (--strict)")
        summary.skipped.append(f"{where}: {reason}")
        logger.warning("skipping %s: %s", where, reason)

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {k: IndexedDatasetWriter(output_prefix_for(output_prefix, k), dtype) for k in keys}
    start = time.perf_counter()
    docs = read_documents(inputs, keys, txt_split, report)
    bar = tqdm(disable=not progress, unit=" docs", desc="preprocess", dynamic_ncols=True)
    pool = None
    try:
        batches = _batches(docs, keys, append_eod, summary)
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_type, str(vocab_file)))
            results = pool.imap(_encode_batch, batches, chunksize=1)
        else:
            _WORKER["tok"] = tokenizer
            results = map(_encode_batch, batches)
        for per_key in results:
            for key, ids_list in zip(keys, per_key, strict=True):
                for ids in ids_list:
                    writers[key].add_document(ids)
                    summary.tokens += len(ids)
            summary.documents += len(per_key[0])
            elapsed = time.perf_counter() - start
            bar.update(len(per_key[0]))
            bar.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tok/s, {summary.bytes_read / elapsed / 1e6:.2f} MB/s")
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    summary.seconds = time.perf_counter() - start
    return summary
