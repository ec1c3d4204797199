"""Reading back what W&B logged offline: the ``run-*.wandb`` record log (LevelDB log framing, protobuf records).

wandb 0.31 ships no Python reader for its offline files (its core is in Go), so this reads the framing
itself: 7-byte file header, then 32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1) | data``,
types 1 full, 2 first, 3 middle, 4 last.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _bodies(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        if kind == 1:
            yield body
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            yield pending + body


def history(run_file: Path) -> list[dict]:
    """Every ``wandb.log`` call of the run, as dicts (keys as logged, plus W&B's own ``_step`` etc.)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for body in _bodies(run_file):
        record = pb.Record()
        record.ParseFromString(body)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
