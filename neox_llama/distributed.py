"""Joining and leaving the process group of a launched run (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The process was not started the way a run must be (e.g. train.py without deepy.py)."""


@dataclass
class RankInfo:
    """Who this process is in the run."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(accelerator: str) -> RankInfo:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (set by deepy.py or a launcher)."""
    import deepspeed

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: start training through deepy.py "
                           "(python deepy.py train.py CONFIG.yml ...), not train.py directly")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if accelerator == "cuda" else "gloo")
    info = RankInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)
    logger.debug("joined process group: rank %d of %d on %s", info.rank, info.world_size, device)
    return info


def shutdown_distributed() -> None:
    """Leave the process group cleanly: a final barrier, then destroy it (avoids an abort at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
