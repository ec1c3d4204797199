"""Every multi-rank case of the suite for one world size, run in one launch through DeepSpeed's launcher.

    PYTHONPATH=tests python -m deepspeed.launcher.runner --num_gpus N tests/workers/cases.py PLAN.json

Starting N ranks costs 10-25 s (Python, torch and DeepSpeed imports, the rendezvous); a case on started
ranks costs 1-5 s. So the suite launches each world size once (DeepSpeed's own tests reuse their process
group the same way) and every rank runs the plan's cases in order, in one process group made here: each case
builds its own engine and groups; ``init_distributed`` joins this group and ``shutdown_distributed`` leaves
it standing. A case writes its rank's log to ``CASE_DIR/rank{R}.log`` and its exit status to
``CASE_DIR/rank{R}.status``; a case that raises ends the launch (the other ranks may be inside a collective),
and the cases after it are reported as not run.

Case kinds: ``parallel_step``, ``lora_steps`` and ``optimizer_state`` (the worker modules beside this file) and ``train`` (the
per-rank training entry, ``train.py --config FILE``, on a config that deepy.py's checks prepared).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


def run_case(kind: str, argv: list[str]) -> int:
    """One case on this rank; its exit status."""
    if kind == "train":
        from neox_llama.cli import train

        return train.main(argv)
    if kind == "parallel_step":
        from workers.parallel_step import run
    elif kind == "lora_steps":
        from workers.lora_steps import run
    elif kind == "optimizer_state":
        from workers.optimizer_state import run
    else:
        raise ValueError(f"unknown case kind {kind}")
    run(argv)
    return 0


def main(plan_file: str) -> int:
    import deepspeed  # noqa: F401  (before any case: its logger's handler binds to this process's stdout, not to a case's log)

    plan = json.loads(Path(plan_file).read_text())
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank()
    root = logging.getLogger()
    for case in plan:
        folder = Path(case["dir"])
        folder.mkdir(parents=True, exist_ok=True)
        handlers = root.handlers[:]
        with open(folder / f"rank{rank}.log", "w", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                code = run_case(case["kind"], case["argv"])
            except SystemExit as exit_:  # e.g. a command-line error: a status, as the process would end
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = None
            root.handlers[:] = handlers
        (folder / f"rank{rank}.status").write_text(str(code))
        if code is None:
            sys.stderr.write(f"rank {rank}: case {case['name']} raised (see {folder / f'rank{rank}.log'}); stopping\n")
            sys.stderr.flush()
            os._exit(1)
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
