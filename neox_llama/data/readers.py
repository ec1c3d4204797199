"""Corpus files for preprocessing: each input kind, plain or compressed, read as records in one text encoding.

A record that cannot be used (a line that is not valid text in the encoding, JSON that is not an object, text no
tokenizer can encode) is the preprocessing loop's to skip and count. A file that cannot be read to its end (not
gzip or zstd data, a truncated stream, a read error such as EIO) is not a shorter corpus: it stops preprocessing
with one :class:`PreprocessError` naming the file and how many lines were read.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from neox_llama.errors import NeoxLlamaError
from neox_llama.tokenizers.text import undecodable_reason

COMPRESSED = (".gz", ".zst")
KINDS = (".jsonl", ".json", ".txt")
READ_CHUNK = 1 << 17
ENCODING_HINT = "a corpus in another encoding needs --encoding, e.g. --encoding latin-1"


class PreprocessError(NeoxLlamaError):
    """Bad input (with --strict), an unreadable file or a bad option; the message names file and line."""


@dataclass
class Malformed:
    """A record that was read but cannot be used, and why."""

    reason: str


def input_kind(path: Path) -> str:
    """``.jsonl``, ``.json`` or ``.txt`` (the suffix before any ``.gz``/``.zst``); PreprocessError otherwise."""
    suffixes = [s for s in path.suffixes if s not in COMPRESSED]
    kind = suffixes[-1] if suffixes else ""
    if kind not in KINDS:
        raise PreprocessError(f"{path}: unsupported input type; use .jsonl, .json or .txt (optionally .gz/.zst), "
                              ".parquet, or a folder saved by datasets' save_to_disk")
    return kind


def check_encoding(encoding: str) -> None:
    """PreprocessError unless Python knows ``encoding`` as a text encoding."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise PreprocessError(f"--encoding {encoding!r} is not a text encoding Python knows; use e.g. utf-8, latin-1 "
                              "or cp1252")


class ZstdStream(io.RawIOBase):
    """The decompressed bytes of every frame of a ``.zst`` file.

    zstandard's own ``stream_reader`` ends quietly when the file ends inside a frame, so a truncated file reads as a
    shorter one; this raises EOFError there instead, as ``gzip`` does for a truncated ``.gz``.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._frame: zstandard.ZstdDecompressionObj | None = None  # the frame being read; None between frames
        self._out, self._at = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while self._at == len(self._out):
            if self._frame is not None and self._frame.eof:
                data, self._frame = self._frame.unused_data, None
            else:
                data = self._raw.read(READ_CHUNK)
                if not data:
                    if self._frame is not None:
                        raise EOFError("the file ends inside a zstd frame")
                    return 0
            if data:
                self._frame = self._frame or zstandard.ZstdDecompressor().decompressobj()
                self._out, self._at = memoryview(self._frame.decompress(data)), 0
        n = min(len(buffer), len(self._out) - self._at)
        memoryview(buffer).cast("B")[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes as stored (tests replace this to simulate a failing disk)."""
    return open(path, "rb")


def _decompressed(raw: BinaryIO, path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if path.suffix == ".zst":
        return io.BufferedReader(ZstdStream(raw), READ_CHUNK)  # type: ignore[return-value]
    return raw


def _failure(err: Exception, path: Path, encoding: str) -> str:
    """What went wrong reading ``path``, in a few words."""
    codec = {".gz": "gzip", ".zst": "zstd"}.get(path.suffix, "")
    if isinstance(err, EOFError):
        return f"truncated {codec} stream (the file ends before the stream does)"
    if isinstance(err, gzip.BadGzipFile):
        return f"not gzip data ({err})"
    if isinstance(err, zstandard.ZstdError):
        return f"not valid zstd data ({err})"
    if isinstance(err, zlib.error):
        return f"corrupt gzip data ({err})"
    if isinstance(err, UnicodeDecodeError):
        return f"not valid {encoding} text ({err.reason})"
    if isinstance(err, OSError) and err.strerror:
        return f"read error ({err.strerror}, errno {err.errno})"
    return f"read error ({err})"


READ_ERRORS = (OSError, EOFError, zstandard.ZstdError, zlib.error, UnicodeDecodeError)


def json_reason(err: json.JSONDecodeError) -> str:
    """json's message without its truncation ("Invalid control character at" -> "... at column 12")."""
    return f"{err.msg} column {err.colno}" if err.msg.endswith(" at") else f"{err.msg} at column {err.colno}"


def _records(path: Path, handle: io.TextIOBase, kind: str, txt_split: str, encoding: str,
             progress: list[int]) -> Iterator[tuple[str, object]]:
    """The records of one open file; ``progress[0]`` counts the lines read."""
    if kind == ".jsonl":
        for line in handle:
            progress[0] += 1
            if line.strip():
                bad = undecodable_reason(line, encoding)
                yield f"{path}:{progress[0]}", Malformed(f"{bad}; {ENCODING_HINT}") if bad else line
        return
    lines = []
    for line in handle:
        progress[0] += 1
        lines.append(line)
    text = "".join(lines)
    if kind == ".json":
        bad = undecodable_reason(text, encoding, first_line=1)
        if bad:
            raise PreprocessError(f"{path}: {bad}; a .json input is one JSON document, refused whole; {ENCODING_HINT}")
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise PreprocessError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({json_reason(err)})") from None
        if not isinstance(items, list):
            raise PreprocessError(f"{path}: a .json input must hold a list of objects")
        for n, item in enumerate(items):
            yield f"{path}:item {n}", item
    elif txt_split == "file":
        bad = undecodable_reason(text, encoding, first_line=1)
        yield f"{path}", Malformed(f"{bad}; {ENCODING_HINT}") if bad else {"text": text}
    else:
        line, n = 1, 0
        for block in text.split("\n\n"):
            if block.strip():
                n += 1
                bad = undecodable_reason(block, encoding, first_line=line)
                yield f"{path}:paragraph {n}", Malformed(f"{bad}; {ENCODING_HINT}") if bad else {"text": block}
            line += block.count("\n") + 2


def read_records(paths: list[Path], txt_split: str, encoding: str = "utf-8") -> Iterator[tuple[str, object]]:
    """(location, raw record) for every input in order: a JSON line, a parsed .json item, a text document, or a
    :class:`Malformed` record. Bytes that are not valid ``encoding`` make their record malformed (a ``.json`` file
    is one document: refused whole); a file that fails to read raises PreprocessError."""
    for path in paths:
        if not path.is_file():
            raise PreprocessError(f"{path}: input file not found")
        kind = input_kind(path)
        progress = [0]
        try:
            with open_binary(path) as raw, \
                    io.TextIOWrapper(_decompressed(raw, path), encoding=encoding, errors="surrogateescape") as handle:
                yield from _records(path, handle, kind, txt_split, encoding, progress)
        except READ_ERRORS as err:
            raise PreprocessError(f"{path}: {_failure(err, path, encoding)} after {progress[0]:,} line(s) were read; "
                                  "stopped, no output was written") from None
