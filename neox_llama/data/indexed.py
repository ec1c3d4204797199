"""Megatron / GPT-NeoX ``MMIDIDX`` token datasets: ``PREFIX.bin`` (tokens) + ``PREFIX.idx`` (index).

``.idx`` layout, little-endian: magic ``MMIDIDX\\x00\\x00`` (9 bytes), version u64 = 1, dtype code u8,
number of sequences u64, number of doc_idx entries u64, then int32 sizes (tokens per sequence),
int64 pointers (byte offset of each sequence in ``.bin``) and int64 doc_idx (sequence index where each
document starts, with the total number of sequences last). Dtype codes: 1 u8, 2 i8, 3 i16, 4 i32,
5 i64, 6 f32, 7 f64, 8 u16. Files written here are byte-compatible with Megatron's and GPT-NeoX's.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from neox_llama.errors import NeoxLlamaError
from neox_llama.utils.files import atomic_write_text

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32,
                           7: np.float64, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER = len(MAGIC) + 8 + 1 + 8 + 8


class IndexedDatasetError(NeoxLlamaError):
    """A dataset file is missing, malformed or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits, else int32."""
    return np.uint16 if vocab_size < 65_500 else np.int32


def data_file(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def index_file(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Append token sequences, mark document ends, then ``finalize()``.

    Both files are written under temporary names and renamed at the end, so an interrupted run never
    leaves a file under the final name. Use as a context manager: on an exception nothing is renamed.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp")
        self._tmp_bin.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]

    def add(self, tokens) -> None:
        """Append one sequence."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self.sizes.append(array.size)

    def end_document(self) -> None:
        """The sequences added since the last call form one document."""
        self.doc_idx.append(len(self.sizes))

    def add_document(self, tokens) -> None:
        self.add(tokens)
        self.end_document()

    def add_documents(self, flat: np.ndarray, sizes) -> None:
        """Append several one-sequence documents given as one flat array and their sizes (a single write)."""
        array = np.ascontiguousarray(flat, dtype=self.dtype)
        if int(np.sum(sizes)) != array.size:
            raise ValueError(f"add_documents: sizes sum to {int(np.sum(sizes))} but {array.size} tokens were given")
        self._bin.write(memoryview(array).cast("B"))
        first = len(self.sizes)
        self.sizes.extend(int(n) for n in sizes)
        self.doc_idx.extend(range(first + 1, len(self.sizes) + 1))

    def finalize(self) -> None:
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        tmp_idx = Path(f"{self.prefix}.idx.tmp")
        with open(tmp_idx, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", CODES[self.dtype]))
            out.write(struct.pack("<Q", len(sizes)))
            out.write(struct.pack("<Q", len(self.doc_idx)))
            out.write(sizes.tobytes(order="C"))
            out.write(pointers.tobytes(order="C"))
            out.write(np.asarray(self.doc_idx, dtype=np.int64).tobytes(order="C"))
        os.replace(self._tmp_bin, data_file(self.prefix))
        os.replace(tmp_idx, index_file(self.prefix))

    def abort(self) -> None:
        """Drop the temporary files."""
        self._bin.close()
        for tmp in (self._tmp_bin, Path(f"{self.prefix}.idx.tmp")):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader: ``ds[i]`` is sequence i (a numpy view, nothing copied); O(1) slices."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = index_file(prefix), data_file(prefix)
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise IndexedDatasetError(f"{path}: not found (dataset prefix {prefix}; made by tools/preprocess_data.py)")
        size = idx_path.stat().st_size
        with open(idx_path, "rb") as handle:
            header = handle.read(HEADER)
        if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(f"{idx_path}: not an MMIDIDX index (wrong magic bytes)")
        if len(header) < HEADER:
            raise IndexedDatasetError(f"{idx_path}: truncated header ({size} bytes)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: MMIDIDX version {version}; only version {VERSION} is supported")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}; valid codes are {sorted(DTYPES)}")
        self.dtype = np.dtype(DTYPES[code])
        count, doc_count = struct.unpack("<QQ", header[18:34])
        expected = HEADER + 4 * count + 8 * count + 8 * doc_count
        if size != expected:
            raise IndexedDatasetError(f"{idx_path}: {size} bytes, but its header describes {count} sequences and "
                                      f"{doc_count} document entries ({expected} bytes): truncated or corrupt")
        self._index = np.memmap(idx_path, mode="r", order="C")
        self.sizes = np.frombuffer(self._index, dtype=np.int32, count=count, offset=HEADER)
        self.pointers = np.frombuffer(self._index, dtype=np.int64, count=count, offset=HEADER + 4 * count)
        self.doc_idx = np.frombuffer(self._index, dtype=np.int64, count=doc_count, offset=HEADER + 12 * count)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if count else 0
        have = bin_path.stat().st_size
        if have != need:
            raise IndexedDatasetError(f"{bin_path}: {have} bytes, but {idx_path} describes {need} bytes of "
                                      f"{self.dtype.name} tokens: the two files do not belong together or one is truncated")
        self._data = np.memmap(bin_path, mode="r", order="C") if have else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of sequence ``index``."""
        size = int(self.sizes[index])
        length = size - offset if length is None else length
        start = int(self.pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def max_token_id(self, chunk: int = 1 << 26) -> int | None:
        """The largest token id in the data (None when empty): a chunked scan of the memory map, remembered in
        ``{prefix}_max_token_id.json`` beside the data (keyed by the .bin's size and time) so launches scan once."""
        bin_path = data_file(self.prefix)
        stat = bin_path.stat()
        key = {"bin_size": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}
        cache = Path(f"{self.prefix}_max_token_id.json")
        try:
            saved = json.loads(cache.read_text())
            if {k: saved.get(k) for k in key} == key:
                return saved["max_token_id"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        tokens = np.frombuffer(self._data, dtype=self.dtype) if len(self._data) else np.zeros(0, dtype=self.dtype)
        top = int(max(tokens[i:i + chunk].max() for i in range(0, tokens.size, chunk))) if tokens.size else None
        try:
            atomic_write_text(cache, json.dumps({**key, "max_token_id": top}))
        except OSError:
            pass  # a read-only data folder: scan again next time
        return top

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def document_sizes(self) -> np.ndarray:
        """Tokens per document (documents may span several sequences)."""
        starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        return np.diff(starts[self.doc_idx])
