"""DeepSpeed's just-in-time built ops (CPU Adam for ZeRO-Offload, async I/O for NVMe): a build lock left by a
killed build never hangs a run.

torch's ``cpp_extension`` (which DeepSpeed's op builders call) guards a build with a ``lock`` file in the op's
build folder and waits on it without a limit. A build killed half way (Ctrl-C, kill -9, an out-of-memory kill)
leaves that file behind, and every later run that needs the op then waits for ever with no word. A build takes
about a minute here (CPU Adam: 40-90 s on 2 cores), so a lock far older than that has no builder left.
torch offers no API for this, hence these few lines.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_AFTER_S = 900.0
"""A build lock older than this (seconds) is left by a killed build."""


def build_lock(op_name: str) -> Path:
    """The lock file torch's cpp_extension holds while it builds ``op_name`` (in TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions, under the Python/CUDA-specific folder)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op_name, verbose=False)) / "lock"


def clear_stale_build_lock(op_name: str, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Remove ``op_name``'s build lock when it is older than ``stale_after_s`` (saying so); True if removed."""
    lock = build_lock(op_name)
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= stale_after_s:
        return False  # a build in progress (another rank or job): wait for it, as torch does
    lock.unlink(missing_ok=True)
    logger.warning("removed %s, left %.0f min ago by a build of DeepSpeed's %s op that never finished "
                   "(it would make this run wait for ever); the op is built again", lock, age / 60, op_name)
    return True
