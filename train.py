#!/usr/bin/env python
"""Per-rank entry point, started by deepy.py on every rank:  python deepy.py train.py CONFIG.yml ...

Pretrains, resumes or fine-tunes as the merged config says (see neox_llama/training/trainer.py).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

logger = logging.getLogger("train")


def _same_config_everywhere(path: str, world_size: int) -> None:
    import torch.distributed as dist

    with open(path, "rb") as handle:
        digest = int.from_bytes(hashlib.sha256(handle.read()).digest()[:6], "little")
    digests = [None] * world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks read different configs from {path}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="neox_llama per-rank training entry (start it through deepy.py)")
    parser.add_argument("--config", required=True, help="merged config file written by deepy.py")
    args = parser.parse_args(argv)

    from neox_llama.config import ConfigError, load_config
    from neox_llama.data.indexed import IndexedDatasetError
    from neox_llama.launcher import detect_accelerator
    from neox_llama.tokenizers import TokenizerError, build_tokenizer
    from neox_llama.utils.logging_setup import setup_logging

    setup_logging("info")
    accelerator = detect_accelerator()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config([args.config], world_size=world_size, accelerator=accelerator, apply_presets=False)
        tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.vocab_file) if cfg.vocab_file and cfg.tokenizer_type else None
        if tokenizer is not None and cfg.vocab_size is None:
            cfg = load_config([args.config], world_size=world_size, accelerator=accelerator, apply_presets=False,
                              tokenizer_vocab=tokenizer.vocab_size)
    except (ConfigError, TokenizerError) as err:
        for line in str(err).splitlines():
            logger.error("%s", line)
        return 2
    setup_logging(cfg.log_level)

    from neox_llama.distributed import LaunchError, init_distributed, shutdown_distributed
    from neox_llama.training.checkpoint import CheckpointError
    from neox_llama.training.trainer import Trainer, TrainingError

    try:
        info = init_distributed(accelerator)
    except LaunchError as err:
        logger.error("%s", err)
        return 2
    code = 0
    try:
        _same_config_everywhere(args.config, info.world_size)
        code = Trainer(cfg, info, accelerator, tokenizer).train()
    except (TrainingError, CheckpointError, IndexedDatasetError, TokenizerError, ValueError) as err:
        logger.error("%s", err)
        code = getattr(err, "exit_code", 2)
    finally:
        if code == 0:
            shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
