"""Bad-input cases of text and corpora (issue 27): text no tokenizer can encode, corpora in another encoding, and
damaged inputs (not gzip/zstd, a truncated stream, a read error), which stop preprocessing with one line naming the
file and how far it got, and leave no output behind (an existing output untouched)."""

from __future__ import annotations

import errno
import gzip
import io
import json
from pathlib import Path
from unittest import mock

import zstandard

from helpers.bad_inputs import empty_output as _out
from helpers.bad_inputs import preprocess_tool as _preprocess
from helpers.bad_inputs import tree_hash
from helpers.data import make_docs
from neox_llama.data import readers


def _corpus(n: int = 2000) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in make_docs(n, seed=5)).encode()


def case_text_preprocess_lone_surrogate(world, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a \\ud800 b"}\n')  # valid JSON: the escape of a lone surrogate
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out), \
        f"{path}:1: the value of 'text' holds a lone surrogate \\ud800 at character 3, which no tokenizer can encode", \
        protected


def case_text_preprocess_latin1_jsonl_without_encoding(world, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "café au lait"}\n'.encode("latin-1"))
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out), \
        f"{path}:1: not valid utf-8 text (byte 0xe9 at column 14); a corpus in another encoding needs --encoding", \
        protected


def case_text_preprocess_latin1_json_without_encoding(world, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"text": "ok"},\n {"text": "café"}]'.encode("latin-1"))
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out), \
        f"{path}: not valid utf-8 text (byte 0xe9 at line 2 column 15); a .json input is one JSON document", protected


def case_text_preprocess_unknown_encoding(world, tmp_path):
    out, protected = _out(tmp_path)
    return _preprocess(world, world["w"] / "corpus.jsonl", out, "--encoding", "latin-9000"), \
        "--encoding 'latin-9000' is not a text encoding Python knows", protected


def case_text_instruction_lone_surrogate(world, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n{"instruction": "a\\ud800", "output": "b"}\n')
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out, "--instruction"), \
        f"{path}: record 1: field 'instruction' holds a lone surrogate \\ud800 at character 2", protected


def case_corpus_zst_that_is_not_zstd(world, tmp_path):
    path = tmp_path / "plain.jsonl.zst"
    path.write_bytes(_corpus(20))
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out), \
        f"{path}: not valid zstd data (zstd decompressor error: Unknown frame descriptor) after 0 line(s) were read", \
        protected


def case_corpus_zst_cut_in_half(world, tmp_path):
    # was exit 0 with 617 of 2,000 documents and "1 malformed record(s) skipped"
    path = tmp_path / "half.jsonl.zst"
    data = zstandard.ZstdCompressor().compress(_corpus())
    path.write_bytes(data[: len(data) // 2])
    out, protected = _out(tmp_path)
    proc = _preprocess(world, path, out, "--workers", "2")
    return proc, f"{path}: truncated zstd stream (the file ends before the stream does) after ", protected


def case_corpus_gz_truncated_keeps_the_existing_output(world, tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(_corpus())
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = _preprocess(world, world["w"] / "corpus.jsonl", out)  # a good output under the same prefix
    assert proc.returncode == 0, proc.stderr
    before = tree_hash(out)
    return _preprocess(world, path, out), \
        f"{path}: truncated gzip stream (the file ends before the stream does) after ", [(out, before)]


def case_corpus_gz_that_is_not_gzip(world, tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(_corpus(20))
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out), f"{path}: not gzip data (Not a gzipped file (b'{{\"')) after 0 line(s)", \
        protected


class _FailingDisk(io.RawIOBase):
    """A file whose reads fail with EIO after ``good`` bytes, as a dying disk's do (no root needed)."""

    def __init__(self, path: Path, good: int):
        self.data, self.at, self.good = path.read_bytes(), 0, good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.at >= self.good:
            raise OSError(errno.EIO, "Input/output error")
        n = min(len(buffer), self.good - self.at)
        buffer[:n] = self.data[self.at:self.at + n]
        self.at += n
        return n


def case_corpus_read_error_eio(world, tmp_path):
    path = tmp_path / "disk.jsonl"
    path.write_bytes(_corpus())
    out, protected = _out(tmp_path)
    with mock.patch.object(readers, "open_binary", lambda p: io.BufferedReader(_FailingDisk(p, 40_000))):
        proc = _preprocess(world, path, out)
    return proc, f"{path}: read error (Input/output error, errno 5) after ", protected
