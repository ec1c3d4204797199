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
import tempfile

from neox_llama.cli.runner import command

logger = logging.getLogger("train")


def _same_config_everywhere(path: str, world_size: int) -> None:
    import torch.distributed as dist

    from neox_llama.distributed import LaunchError

    with open(path, "rb") as handle:
        digest = int.from_bytes(hashlib.sha256(handle.read()).digest()[:6], "little")
    digests = [None] * world_size
    dist.all_gather_object(digests, digest)  # Python objects: staged on the CPU (gloo)
    if len(set(digests)) != 1:
        raise LaunchError(f"ranks read different configs from {path}; every node must get the same merged config")


@command("train.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="neox_llama per-rank training entry (start it through deepy.py)")
    parser.add_argument("--config", required=True, help="merged config file written by deepy.py")
    parser.add_argument("--config-data", help="the merged config itself (base64 YAML), for nodes that cannot read "
                                              "--config; deepy.py passes it on multi-node launches")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment this rank needs (set before torch/DeepSpeed start); remote launchers "
                             "forward only some variables, so deepy.py passes these on the command line")
    args = parser.parse_args(argv)
    for item in args.env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    temporary = None
    if args.config_data is not None:
        args.config, temporary = _config_from_data(args.config, args.config_data)
    try:
        return _run(args)
    finally:
        if temporary:
            os.unlink(temporary)


def _run(args: argparse.Namespace) -> int:
    from neox_llama.errors import NeoxLlamaError
    from neox_llama.planning.launch import detect_accelerator
    from neox_llama.utils.logging_setup import setup_logging

    setup_logging("info")
    accelerator = detect_accelerator()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, tokenizer = _load(args.config, world_size, accelerator)
    except NeoxLlamaError as err:
        for line in str(err).splitlines():
            logger.error("%s", line)
        return err.exit_code
    setup_logging(cfg.log_level)

    from neox_llama.distributed import RankFailed, init_distributed, shutdown_distributed

    try:
        info = init_distributed(accelerator, cfg.distributed_timeout_minutes)
    except NeoxLlamaError as err:
        logger.error("%s", err)
        return err.exit_code
    try:
        _same_config_everywhere(args.config, info.world_size)
        from neox_llama.training.trainer import Trainer

        code = Trainer(cfg, info, accelerator, tokenizer).train()
    except RankFailed as err:
        # Another rank failed and logged why; say it once (rank 0), then leave without entering a collective.
        if info.rank == 0:
            logger.error("%s", err)
        return err.exit_code
    except NeoxLlamaError as err:
        logger.error("%s", err)
        return err.exit_code
    except Exception:
        logger.exception("rank %d failed with an unexpected error", info.rank)
        return 1
    if code == 0:
        shutdown_distributed()
    return code


def _config_from_data(path: str, data: str) -> tuple[str, str | None]:
    """The merged config passed on the command line: ``path`` when it holds the same text, else a private
    temporary copy on this node; returns (the file to read, the temporary file to remove or None)."""
    import base64

    text = base64.b64decode(data.encode("ascii")).decode("utf-8")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return path, None
    fd, local = tempfile.mkstemp(prefix="neox_llama_config_", suffix=".yml")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return local, local


def _load(config_file: str, world_size: int, accelerator: str):
    """The merged config (validated for this world) and its tokenizer, built once."""
    from neox_llama.config import load_config
    from neox_llama.config.loading import load_raw
    from neox_llama.tokenizers import build_tokenizer

    raw, _ = load_raw([config_file], apply_presets=False)
    tokenizer = None
    if raw.get("vocab_file") and raw.get("tokenizer_type"):
        tokenizer = build_tokenizer(raw["tokenizer_type"], raw["vocab_file"])
    cfg = load_config([config_file], world_size=world_size, accelerator=accelerator, apply_presets=False,
                      tokenizer_vocab=tokenizer.vocab_size if tokenizer else None)
    return cfg, tokenizer


if __name__ == "__main__":  # the launcher runs this file on every rank (python .../neox_llama/cli/train.py --config ...)
    sys.exit(main())
