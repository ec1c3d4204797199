"""MMIDIDX files: byte-identical to an independent writer from the format spec, round trip, clear errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from neox_llama.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, token_dtype

DOCS = [[5, 6, 7], [1], [65000, 2, 3, 4, 9], [42, 42]]


def spec_writer(prefix, docs, code, fmt):
    """A minimal writer written from the format description, independent of ours."""
    sizes = [len(d) for d in docs]
    itemsize = struct.calcsize(fmt)
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(struct.pack(f"<{len(d)}{fmt}", *d))
    pointers, pos = [], 0
    for s in sizes:
        pointers.append(pos)
        pos += s * itemsize
    doc_idx = list(range(len(docs) + 1))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.mark.parametrize(("dtype", "code", "fmt"), [(np.uint16, 8, "H"), (np.int32, 4, "i")])
def test_writer_is_byte_identical_to_the_spec_and_round_trips(tmp_path, dtype, code, fmt):
    with IndexedDatasetWriter(tmp_path / "ours", dtype) as writer:
        for doc in DOCS:
            writer.add_document(doc)
    spec_writer(tmp_path / "spec", DOCS, code, fmt)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"spec.{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "spec")
    assert ds.dtype == np.dtype(dtype) and len(ds) == 4 and ds.num_tokens == 11
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds.get(2, offset=1, length=3).tolist() == [2, 3, 4]
    assert ds.document_sizes.tolist() == [3, 1, 5, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(32_000) is np.uint16 and token_dtype(128_256) is np.int32


def test_interrupted_write_leaves_no_final_file(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path):
    spec_writer(tmp_path / "d", DOCS, 8, "H")
    return tmp_path / "d"


def corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_wrong_magic(good):
    corrupt(good.with_suffix(".idx"), 0, b"NOTMMIDX")
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: not an MMIDIDX index \(wrong magic bytes\)"):
        IndexedDataset(good)


def test_wrong_version(good):
    corrupt(good.with_suffix(".idx"), 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match="MMIDIDX version 2; only version 1"):
        IndexedDataset(good)


def test_unknown_dtype_code(good):
    corrupt(good.with_suffix(".idx"), 17, b"\x09")
    with pytest.raises(IndexedDatasetError, match="unknown dtype code 9"):
        IndexedDataset(good)


def test_truncated_index(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-5])
    with pytest.raises(IndexedDatasetError, match="truncated or corrupt"):
        IndexedDataset(good)
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(IndexedDatasetError, match="truncated header"):
        IndexedDataset(good)


def test_bin_does_not_match_index(good):
    data = good.with_suffix(".bin")
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: 20 bytes, but .* describes 22 bytes"):
        IndexedDataset(good)


def test_missing_files(tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"nope\.idx: not found"):
        IndexedDataset(tmp_path / "nope")
