"""Columnar corpora: ``.parquet`` files and folders saved by ``datasets.save_to_disk``, as records for preprocessing.

A parquet file is read a batch of rows at a time (pyarrow, only the columns named by ``--jsonl-keys``): never the
whole file in memory. A ``save_to_disk`` folder is opened with the ``datasets`` library, which memory-maps its
arrow files, and read the same way (a ``DatasetDict`` folder: the split named by ``--split``). Each row becomes the
record ``{column: text}`` that a JSON line with the same values gives, so the tokens and the files written are the
same as for JSONL; its location is ``FILE:row N`` (N counts from 0, as ``dataset[N]``).

Parquet strings are UTF-8. A value that is not valid UTF-8 makes its record malformed (skipped and counted, as a
JSONL line in the wrong encoding); a lone surrogate written as UTF-8 bytes reads as that surrogate, which the text
policy refuses like a JSON ``"\\ud800"``. A file that is not parquet, truncated, or damaged, or that lacks a column,
stops preprocessing with one :class:`PreprocessError` naming the file (and the column and the valid ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neox_llama.data.readers import Malformed, PreprocessError, open_binary, read_records
from neox_llama.data.readers import input_kind as file_kind
from neox_llama.tokenizers.text import undecodable_reason

PARQUET = ".parquet"
DATASET_FOLDER = "datasets folder"
ROWS_PER_BATCH = 1024
MAGIC = b"PAR1"
STOPPED = "stopped, no output was written"


def input_kind(path: Path) -> str:
    """``.parquet``, :data:`DATASET_FOLDER` (a folder), or the kind of a text input (:func:`readers.input_kind`)."""
    if path.is_dir():
        return DATASET_FOLDER
    if not path.suffix and not path.exists():
        raise PreprocessError(f"{path}: no such file or folder (a folder saved by datasets' save_to_disk, or a file)")
    if path.suffix == PARQUET:
        return PARQUET
    if PARQUET in path.suffixes:
        raise PreprocessError(f"{path}: a parquet file is read as stored (parquet compresses its own pages); "
                              "decompress it to .parquet")
    return file_kind(path)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _check_columns(where: str, schema: pa.Schema, keys: Sequence[str]) -> None:
    texts = [f.name for f in schema if _is_text(f.type)]
    for key in keys:
        if key not in schema.names:
            raise PreprocessError(f"{where}: no column {key!r} (--jsonl-keys); its text columns are: "
                                  f"{', '.join(texts) or 'none'} (all columns: {', '.join(schema.names)})")
        if not _is_text(schema.field(key).type):
            raise PreprocessError(f"{where}: column {key!r} holds {schema.field(key).type}, not text (--jsonl-keys); "
                                  f"its text columns are: {', '.join(texts) or 'none'}")


def _open_parquet(path: Path, raw) -> pq.ParquetFile:
    """The parquet file of ``raw`` (its footer read), or PreprocessError saying why it is not one."""
    size = raw.seek(0, 2)
    raw.seek(0)
    if size < 12 or raw.read(4) != MAGIC:  # header PAR1, footer, footer length, PAR1
        raise PreprocessError(f"{path}: not a parquet file (it does not start with PAR1, {size:,} bytes); {STOPPED}")
    raw.seek(size - 4)
    if raw.read(4) != MAGIC:
        raise PreprocessError(f"{path}: truncated parquet file (it starts as parquet but does not end with its "
                              f"footer, {size:,} bytes); {STOPPED}")
    raw.seek(0)
    try:
        return pq.ParquetFile(raw)
    except (pa.ArrowException, OSError) as err:
        raise PreprocessError(f"{path}: damaged parquet footer ({err}); {STOPPED}") from None


def _load_dataset(path: Path, split: str):
    """The ``datasets.Dataset`` saved in folder ``path`` (of a DatasetDict: its ``split``)."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError, pa.ArrowException) as err:
        raise PreprocessError(f"{path}: not a folder saved by datasets' save_to_disk "
                              f"({str(err).splitlines()[0]}); {STOPPED}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PreprocessError(f"{path}: no split {split!r} (--split); its splits are: {', '.join(data)}")
        return data[split], f"{path}[{split}]"
    return data, str(path)


def check_input(path: Path, keys: Sequence[str], split: str) -> None:
    """Before any output: ``path`` exists and, when columnar, opens and has a text column for every key."""
    kind = input_kind(path)
    if kind == DATASET_FOLDER:
        data, where = _load_dataset(path, split)
        _check_columns(where, data.data.schema, keys)
        return
    if not path.is_file():
        raise PreprocessError(f"{path}: input file not found")
    if kind == PARQUET:
        with open_binary(path) as raw:
            _check_columns(str(path), _open_parquet(path, raw).schema_arrow, keys)


def _texts(column: pa.Array) -> list:
    """The column's values as Python strings (None for a null); a value that is not UTF-8 becomes the reason why."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    values: list = []
    for value in column.cast(pa.large_binary()).to_pylist():
        if value is None:
            values.append(None)
            continue
        try:
            values.append(value.decode("utf-8", "surrogatepass"))  # a lone surrogate: the text policy names it
        except UnicodeDecodeError:
            values.append(Malformed(str(undecodable_reason(value.decode("utf-8", "surrogateescape"), "utf-8"))))
    return values


def _rows(where: str, batches: Iterator[pa.RecordBatch | pa.Table], keys: Sequence[str],
          count: list[int]) -> Iterator[tuple[str, object]]:
    for batch in batches:
        columns = [_texts(batch.column(key)) for key in keys]  # type: ignore[arg-type]
        for values in zip(*columns, strict=True):
            bad = next((f"the value of {k!r} is {v.reason}" for k, v in zip(keys, values, strict=True)
                        if isinstance(v, Malformed)), None)
            yield f"{where}:row {count[0]}", Malformed(bad) if bad else dict(zip(keys, values, strict=True))
            count[0] += 1


def _failure(err: BaseException, what: str) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"read error ({err.strerror}, errno {err.errno})"
    return f"damaged {what} data ({str(err).splitlines()[0] if str(err) else type(err).__name__})"


def columnar_records(path: Path, keys: Sequence[str], split: str = "train") -> Iterator[tuple[str, object]]:
    """(``FILE:row N``, ``{key: text}``) for every row of a parquet file or a ``save_to_disk`` folder."""
    count, group = [0], 0
    parquet: pq.ParquetFile | None = None
    folder = input_kind(path) == DATASET_FOLDER
    try:
        if folder:
            data, where = _load_dataset(path, split)
            _check_columns(where, data.data.schema, keys)
            table = data.select_columns(list(keys)).with_format("arrow")
            yield from _rows(where, table.iter(batch_size=ROWS_PER_BATCH), keys, count)
            return
        with open_binary(path) as raw:
            parquet = _open_parquet(path, raw)
            _check_columns(str(path), parquet.schema_arrow, keys)
            for group in range(parquet.num_row_groups):  # one row group at a time: its number for a message
                batches = parquet.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[group], columns=list(keys),
                                               use_threads=False)
                yield from _rows(str(path), batches, keys, count)
    except (pa.ArrowException, OSError, EOFError) as err:
        at = f" in row group {group + 1} of {parquet.num_row_groups}" if parquet is not None else ""
        raise PreprocessError(f"{path}: {_failure(err, 'arrow' if folder else 'parquet')}{at} after {count[0]:,} "
                              f"row(s) were read; {STOPPED}") from None


def read_inputs(paths: list[Path], keys: Sequence[str], txt_split: str, encoding: str = "utf-8",
                split: str = "train") -> Iterator[tuple[str, object]]:
    """(location, raw record) for every input in order: columnar inputs here, text files by
    :func:`readers.read_records` (which reads them as ``encoding``)."""
    for path in paths:
        if input_kind(path) in (PARQUET, DATASET_FOLDER):
            yield from columnar_records(path, keys, split)
        else:
            yield from read_records([path], txt_split, encoding)
