#!/usr/bin/env python
"""Per-rank entry point, started by deepy.py on every rank:  python deepy.py train.py CONFIG.yml ...

Until the training engine lands this joins the process group, reads the merged config, checks that
every rank sees the same world and config, and leaves cleanly.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

logger = logging.getLogger("train")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="neox_llama per-rank training entry (start it through deepy.py)")
    parser.add_argument("--config", required=True, help="merged config file written by deepy.py")
    args = parser.parse_args(argv)

    from neox_llama.config import ConfigError, load_config
    from neox_llama.launcher import detect_accelerator
    from neox_llama.utils.logging_setup import setup_logging

    setup_logging("info")
    accelerator = detect_accelerator()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config([args.config], world_size=world_size, accelerator=accelerator, apply_presets=False)
    except ConfigError as err:
        for line in err.problems:
            logger.error("%s", line)
        return 2
    setup_logging(cfg.log_level)

    import torch
    import torch.distributed as dist

    from neox_llama.distributed import LaunchError, init_distributed, shutdown_distributed

    try:
        info = init_distributed(accelerator)
    except LaunchError as err:
        logger.error("%s", err)
        return 2
    try:
        # Every rank must have read the same config: compare a digest of the file across ranks.
        with open(args.config, "rb") as handle:
            digest = int.from_bytes(hashlib.sha256(handle.read()).digest()[:6], "little")
        digests = [None] * info.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks read different configs from {args.config}")
        total = torch.tensor([float(info.rank + 1)], device=info.device)
        dist.all_reduce(total)
        expected = info.world_size * (info.world_size + 1) / 2
        if total.item() != expected:
            raise RuntimeError(f"all_reduce gave {total.item()}, expected {expected}")
        d = cfg.derived
        logger.info("%d rank(s) up (pp %d x tp %d x dp %d), config %s agrees on every rank; all_reduce ok (%g)",
                    info.world_size, cfg.pipe_parallel_size, cfg.model_parallel_size, d.data_parallel_size,
                    args.config, total.item())
        logger.info("the training engine is not implemented yet: nothing to train")
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
