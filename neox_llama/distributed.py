"""Joining and leaving the process group of a launched run, and sharing one rank's failure with the others.

Backends: on GPUs the process group is ``cpu:gloo,cuda:nccl``, so every collective runs on the backend of
the device its tensor lives on (NCCL for CUDA tensors, gloo for the few host-side tensors: step counters,
flags, Python objects). On CPU it is plain gloo. No collective in neox_llama has to move a tensor first.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from neox_llama.errors import NeoxLlamaError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_JOINED_HERE = False
"""Whether :func:`init_distributed` created this process's group (then :func:`shutdown_distributed` destroys it)."""

BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}
"""Process-group backend per accelerator (a backend per device type on GPUs)."""


class LaunchError(NeoxLlamaError):
    """The process was not started the way a run must be (e.g. train.py without deepy.py)."""


class RankFailed(NeoxLlamaError):
    """Another rank failed; this one stops too, with that rank's message."""

    def __init__(self, message: str, origin_rank: int, exit_code: int = 2):
        super().__init__(message)
        self.origin_rank = origin_rank
        self.exit_code = exit_code


@dataclass
class RankInfo:
    """Who this process is in the run."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def bind_cores(local_rank: int, threads: int) -> list[int] | None:
    """Pin this process to its own ``threads`` cores (local rank i: the i-th group of the cores it may use), so
    ranks sharing a machine do not contend for cores; returns them, or None where there are too few cores."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    # LOCAL_WORLD_SIZE from torchrun and deepy.py's one-rank runs, LOCAL_SIZE from DeepSpeed's launcher
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 0)
    if local_ranks < 1 or local_ranks * threads > len(available) or local_rank >= local_ranks:
        return None  # all ranks of the machine or none: a pinned rank beside unpinned ones would be the slow one
    mine = available[local_rank * threads:(local_rank + 1) * threads]
    try:
        os.sched_setaffinity(0, mine)
    except OSError:  # e.g. cores another cgroup owns: run unpinned rather than fail
        return None
    return mine


def init_distributed(accelerator: str, timeout_minutes: float = 10.0) -> RankInfo:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (set by deepy.py or a launcher).

    ``timeout_minutes`` bounds every collective (a rank that never arrives fails the run instead of hanging it).
    A group that already exists (a host process running several runs in turn, as the test suite does) is joined
    as it is and left standing by :func:`shutdown_distributed`.
    """
    import deepspeed

    global _JOINED_HERE

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: start training through deepy.py "
                          "(python deepy.py train.py CONFIG.yml ...), not train.py directly")
    threads = os.environ.get("OMP_NUM_THREADS")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if threads and os.environ.get("NEOX_LLAMA_BIND_CORES") == "1":
        cores = bind_cores(local_rank, int(threads))
        logger.debug("local rank %d %s", local_rank, f"bound to cores {cores}" if cores else "not bound (too few cores)")
    if threads:
        torch.set_num_threads(int(threads))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if accelerator == "cpu":
        _skip_shared_memory_all_reduce()
    _JOINED_HERE = _JOINED_HERE or not dist.is_initialized()
    try:
        deepspeed.init_distributed(dist_backend=BACKENDS[accelerator], timeout=timedelta(minutes=timeout_minutes))
    except dist.DistNetworkError as err:  # rank 0's store could not listen: the port was taken since deepy checked it
        if "EADDRINUSE" not in str(err):
            raise
        raise LaunchError(f"MASTER_PORT {os.environ['MASTER_PORT']} is already in use on this machine (another run?), "
                          "so rank 0 cannot listen on it: start again (deepy.py picks a free port on one node when "
                          "master_port is taken) or set master_port to a free port") from None
    info = RankInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)
    logger.debug("joined process group: rank %d of %d on %s", info.rank, info.world_size, device)
    return info


def _skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op (``deepspeed_shm_comm``).

    DeepSpeed 0.19 JIT-compiles it in every process that joins a group (≈ 25 s on a fresh machine, under a
    file lock in ~/.cache/torch_extensions that a rank killed mid-build leaves behind, so every later run on
    the machine waits on it for ever), maps ~130 MB of /dev/shm per rank that it never unlinks, and uses it
    only in ``inference_all_reduce``, which training never calls: every collective here goes through
    torch.distributed (gloo) either way.
    """
    # importlib, not ``import deepspeed.comm.torch as m``: that resolves to the ``torch`` attribute of
    # deepspeed.comm, which is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def shutdown_distributed() -> None:
    """Leave the process group cleanly: a final barrier, then destroy it (avoids an abort at exit) if
    :func:`init_distributed` created it; a group the host process made stays for its next run."""
    global _JOINED_HERE
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if _JOINED_HERE:
            dist.destroy_process_group()
            _JOINED_HERE = False


def _describe(err: BaseException) -> tuple[str, int, bool]:
    if isinstance(err, NeoxLlamaError):
        return str(err), getattr(err, "exit_code", 2), True
    return f"{type(err).__name__}: {err}", 1, False


def agree(work: Callable[[], T], *, rank0_only: bool = False, group: dist.ProcessGroup | None = None,
          same_result: str | None = None) -> T | None:
    """Run ``work`` (on every rank, or on the group's first rank only) and make every rank of ``group`` share the outcome.

    If it fails anywhere, every rank raises: the failing rank its own exception, the others
    :class:`RankFailed` with the failing rank's message, so no rank is left waiting in a later collective.
    ``same_result`` (a description of the result) also requires every rank's result to be equal (compared by
    ``repr``), e.g. the checkpoint each rank found; a difference is an error on every rank.
    Without a process group it simply runs ``work``. Collective device: Python objects go through
    ``all_gather_object``, which torch stages on the group's object device (the CPU under gloo).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return work()
    rank = dist.get_rank()
    result, error, outcome = None, None, None
    if not rank0_only or dist.get_rank(group) == 0:
        try:
            result = work()
        except Exception as err:  # shared below, then re-raised on this rank
            error = err
            outcome = _describe(err)
    outcomes: list = [None] * dist.get_world_size(group)
    summary = repr(result) if same_result is not None and error is None else None
    dist.all_gather_object(outcomes, (rank, outcome, summary), group=group)
    if error is not None:
        raise error
    for origin, failed, _ in outcomes:
        if failed is not None:
            message, code, _ = failed
            raise RankFailed(f"rank {origin} failed: {message}", origin, code)
    if same_result is not None and len({s for _, _, s in outcomes}) > 1:
        seen = "; ".join(f"rank {r}: {s}" for r, _, s in outcomes[:4])
        raise RankFailed(f"ranks disagree on {same_result} ({seen}); every node must see the same files", -1)
    return result
