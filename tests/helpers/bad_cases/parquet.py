"""Bad-input cases of parquet and ``datasets`` corpora (issue 28): a file that is not parquet, a truncated one, a
damaged row group, a column that is absent or not text, a folder that ``save_to_disk`` did not write. Each stops
preprocessing with one line naming the file (and the column and the valid ones) and leaves no output behind (an
existing output untouched)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from helpers.bad_inputs import empty_output as _out
from helpers.bad_inputs import preprocess_tool as _preprocess
from helpers.bad_inputs import tree_hash
from helpers.data import make_docs


def _parquet(path: Path, n: int = 600, row_group_size: int = 200) -> Path:
    table = pa.table({"text": make_docs(n, seed=6), "id": list(range(n))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def case_parquet_truncated(world, tmp_path):
    path = _parquet(tmp_path / "cut.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out, "--workers", "2"), \
        f"{path}: truncated parquet file (it starts as parquet but does not end with its footer, " \
        f"{len(data) // 2:,} bytes); stopped, no output was written", protected


def case_parquet_that_is_not_parquet(world, tmp_path):
    path = tmp_path / "corpus.parquet"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(20)))
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out), \
        f"{path}: not a parquet file (it does not start with PAR1, {path.stat().st_size:,} bytes); stopped, " \
        "no output was written", protected


def case_parquet_missing_column(world, tmp_path):
    path = _parquet(tmp_path / "c.parquet")
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out, "--jsonl-keys", "content"), \
        f"{path}: no column 'content' (--jsonl-keys); its text columns are: text (all columns: text, id)", protected


def case_parquet_column_that_is_not_text(world, tmp_path):
    path = _parquet(tmp_path / "c.parquet")
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out, "--jsonl-keys", "id"), \
        f"{path}: column 'id' holds int64, not text (--jsonl-keys); its text columns are: text", protected


def case_parquet_damaged_row_group_keeps_the_existing_output(world, tmp_path):
    path = _parquet(tmp_path / "d.parquet")
    at = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[at:at + 64] = bytes(b ^ 0x5A for b in data[at:at + 64])  # the page header of row group 2's text
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = _preprocess(world, world["w"] / "corpus.jsonl", out)  # a good output under the same prefix
    assert proc.returncode == 0, proc.stderr
    before = tree_hash(out)
    proc = _preprocess(world, path, out, "--workers", "2")
    assert f"{path}: damaged parquet data (" in proc.stderr, proc.stderr[-3000:]  # then pyarrow's words
    return proc, " in row group 2 of 3 after 200 row(s) were read; stopped, no output was written", [(out, before)]


def case_parquet_folder_not_saved_by_datasets(world, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    out, protected = _out(tmp_path)
    return _preprocess(world, folder, out), \
        f"{folder}: not a folder saved by datasets' save_to_disk (Directory {folder} is neither a `Dataset` " \
        "directory nor a `DatasetDict` directory.); stopped, no output was written", protected


def case_parquet_compressed_whole(world, tmp_path):
    path = tmp_path / "c.parquet.gz"
    path.write_bytes(b"\x1f\x8b")
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out), \
        f"{path}: a parquet file is read as stored (parquet compresses its own pages); decompress it to .parquet", \
        protected


def case_parquet_with_instruction(world, tmp_path):
    path = _parquet(tmp_path / "c.parquet")
    out, protected = _out(tmp_path)
    return _preprocess(world, path, out, "--instruction"), \
        f"{path}: --instruction reads .json/.jsonl instruction records; parquet and datasets folders are read as " \
        "plain corpora only (without --instruction)", protected


def case_parquet_saved_folder_that_does_not_exist(world, tmp_path):
    out, protected = _out(tmp_path)
    return _preprocess(world, tmp_path / "saved", out), \
        f"{tmp_path / 'saved'}: no such file or folder (a folder saved by datasets' save_to_disk, or a file)", protected
