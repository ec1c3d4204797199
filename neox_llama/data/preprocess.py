"""Corpus files -> tokenized MMIDIDX datasets (the library behind tools/preprocess_data.py).

Inputs: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.txt`` (one document
per file, or per blank-line-separated paragraph), each optionally compressed (``.gz``, ``.zst``); ``.parquet``
files and folders saved by ``datasets.save_to_disk`` (:mod:`neox_llama.data.columnar`: a row is the record of its
columns). One dataset is written per JSON key (column): ``{output_prefix}_{key}_document.{bin,idx}`` (``text`` for
.txt).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neox_llama.data.columnar import check_input, input_kind, read_inputs
from neox_llama.data.indexed import IndexedDatasetWriter, token_dtype
from neox_llama.data.readers import Malformed, PreprocessError, check_encoding, json_reason
from neox_llama.tokenizers import Tokenizer, build_tokenizer
from neox_llama.tokenizers.text import unencodable_reason

logger = logging.getLogger(__name__)

BATCH_DOCS = 256
SHOWN_PROBLEMS = 5
"""Malformed records shown one by one; the rest are only counted."""


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


def _parse(record: object, keys: list[str]) -> dict[str, str] | str:
    """The texts of a record, or the reason it is malformed (text no tokenizer can encode included: the policy of
    :mod:`neox_llama.tokenizers.text` for data)."""
    if isinstance(record, Malformed):
        return record.reason
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as err:
            return f"not valid JSON ({json_reason(err)})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [k for k in keys if not isinstance(record.get(k), str)]
    if missing:
        return f"no string value for key(s) {', '.join(missing)}"
    for key in keys:
        bad = unencodable_reason(record[key])
        if bad:
            return f"the value of {key!r} holds {bad}"
    return {k: record[k] for k in keys}


_WORKER: dict = {}


def _init_worker(tokenizer_type: str, vocab_file: str) -> None:
    _WORKER["tok"] = build_tokenizer(tokenizer_type, vocab_file)


@dataclass
class _Encoded:
    arrays: list[tuple[np.ndarray, np.ndarray]]
    """Per key, the batch's good documents as one flat token array and their sizes (one write per batch)."""
    errors: list[tuple[str, str]]
    empty: int
    chars: int


def _flatten(encoded: list[Sequence[int]], dtype: str, bos: int | None, eod: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids -> (flat array with BOS/EOD added, sizes), filled in place: no per-document arrays."""
    head, tail = int(bos is not None), int(eod is not None)
    sizes = np.fromiter((len(ids) + head + tail for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(sizes.sum()), dtype=dtype)
    pos = 0
    for ids, size in zip(encoded, sizes.tolist(), strict=True):
        if head:
            flat[pos] = bos
        flat[pos + head:pos + size - tail] = ids
        if tail:
            flat[pos + size - 1] = eod
        pos += size
    return flat, sizes


def _encode_batch(batch: tuple[list[tuple[str, object]], list[str], bool, str, int | None]) -> _Encoded:
    """Parse and tokenize a batch of raw records (runs in a worker process)."""
    records, keys, append_eod, dtype, bos = batch
    tok: Tokenizer = _WORKER["tok"]
    good, errors, empty, chars = [], [], 0, 0
    for where, record in records:
        parsed = _parse(record, keys)
        if isinstance(parsed, str):
            errors.append((where, parsed))
        elif not any(parsed[k].strip() for k in keys):
            empty += 1
        else:
            good.append(parsed)
            chars += sum(len(t) for t in parsed.values())
    arrays = [_flatten(tok.encode_arrays([doc[key] for doc in good]), dtype, bos, tok.eod_id if append_eod else None)
              for key in keys]
    return _Encoded(arrays, errors, empty, chars)


def _batches(records: Iterator[tuple[str, object]], keys: list[str], append_eod: bool, dtype: str, bos: int | None):
    batch: list[tuple[str, object]] = []
    for record in records:
        batch.append(record)
        if len(batch) == BATCH_DOCS:
            yield batch, keys, append_eod, dtype, bos
            batch = []
    if batch:
        yield batch, keys, append_eod, dtype, bos


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def output_prefix_for(output_prefix: str, key: str) -> str:
    """The dataset prefix written for one JSON key (the contract: ``{prefix}_{key}_document``)."""
    return f"{output_prefix}_{key}_document"


def preprocess(inputs: list[Path], output_prefix: str, tokenizer_type: str, vocab_file: str, *,
               keys: tuple[str, ...] = ("text",), append_eod: bool = False, workers: int = 1,
               strict: bool = False, txt_split: str = "file", progress: bool = True,
               prepend_bos: bool | None = None, encoding: str = "utf-8", split: str = "train") -> Summary:
    """Tokenize ``inputs`` into one dataset per key; returns what was done.

    ``prepend_bos`` None follows the start-token policy (BOS first for the sentencepiece and Llama-3
    tokenizers, see :attr:`Tokenizer.starts_with_bos`); False matches data made by GPT-NeoX.
    Fails, writing nothing, when no record gave a document (all malformed or empty, or a key absent), and when an
    input cannot be read to its end (:mod:`neox_llama.data.readers`). Inputs are read as ``encoding`` text; a record
    that is not valid text in it, or holds text no tokenizer can encode, is malformed. Parquet and ``save_to_disk``
    inputs (a DatasetDict's ``split``) are read by column: each key names a text column.
    """
    check_encoding(encoding)
    keys = list(keys) if not all(input_kind(p) == ".txt" for p in inputs) else ["text"]
    for path in inputs:  # before any output or progress bar
        check_input(path, keys, split)
    tokenizer = build_tokenizer(tokenizer_type, vocab_file)
    if prepend_bos is None:
        prepend_bos = tokenizer.starts_with_bos
    if prepend_bos and tokenizer.bos_id is None:
        raise PreprocessError(f"{vocab_file}: --prepend-bos, but the {tokenizer_type} tokenizer has no BOS token")
    bos = tokenizer.bos_id if prepend_bos else None
    summary = Summary()

    def report(where: str, reason: str) -> None:
        if strict:
            raise PreprocessError(f"{where}: {reason} (--strict)")
        summary.skipped.append(f"{where}: {reason}")
        if len(summary.skipped) <= SHOWN_PROBLEMS:
            logger.warning("skipping %s: %s", where, reason)
        elif len(summary.skipped) == SHOWN_PROBLEMS + 1:
            logger.warning("more malformed records: they are counted in the summary, not shown")

    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    made = _missing_folders(Path(output_prefix).parent)
    writers: dict[str, IndexedDatasetWriter] = {}
    start = time.perf_counter()
    bar = tqdm(disable=not progress, unit=" docs", desc="preprocess", dynamic_ncols=True)
    pool = None
    try:
        writers.update({k: IndexedDatasetWriter(output_prefix_for(output_prefix, k), dtype) for k in keys})
        batches = _batches(read_inputs(inputs, keys, txt_split, encoding, split), keys, append_eod, dtype.str, bos)
        _WORKER["tok"] = tokenizer
        if workers > 1:
            if os.name == "posix":  # forked workers inherit the loaded tokenizer
                pool = multiprocessing.get_context("fork").Pool(workers)
            else:
                pool = multiprocessing.get_context("spawn").Pool(
                    workers, initializer=_init_worker, initargs=(tokenizer_type, str(vocab_file)))
            results = pool.imap(_encode_batch, batches, chunksize=1)
        else:
            results = map(_encode_batch, batches)
        for done in results:
            for where, reason in done.errors:
                report(where, reason)
            for key, (flat, sizes) in zip(keys, done.arrays, strict=True):
                writers[key].add_documents(flat, sizes)
                summary.tokens += flat.size
            count = len(done.arrays[0][1])
            summary.documents += count
            summary.empty += done.empty
            summary.bytes_read += done.chars
            elapsed = time.perf_counter() - start
            bar.update(count)
            bar.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tok/s, {summary.bytes_read / elapsed / 1e6:.2f} MB/s")
        if summary.documents == 0:
            first = f"; first: {summary.skipped[0]}" if summary.skipped else ""
            raise PreprocessError(f"no usable document in {', '.join(map(str, inputs))}: "
                                  f"{len(summary.skipped)} malformed record(s), {summary.empty} empty document(s)"
                                  f"{first}; check --jsonl-keys {' '.join(keys)} (nothing was written)")
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        for folder in made:  # the output folders this run created, when nothing else is in them
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    summary.seconds = time.perf_counter() - start
    return summary
