"""Console logging: rank 0 speaks at the configured level, other ranks only warn."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "info", rank: int | None = None) -> None:
    """Configure the root logger once per process.

    ``rank`` defaults to the RANK environment variable; ranks other than 0 log warnings and errors only.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    chosen = getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(chosen)
    # DeepSpeed installs its own handler on its logger; keep it quiet below warnings unless debugging.
    logging.getLogger("DeepSpeed").setLevel(logging.DEBUG if chosen == logging.DEBUG else logging.WARNING)
