"""Starting real gloo ranks on CPU through DeepSpeed's launcher, as deepy.py does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

ABORT_AT_EXIT = "terminate called without an active exception"


def launch(num_ranks: int, script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script ARGS`` on ``num_ranks`` CPU ranks; retried once only for DeepSpeed's rare abort-at-exit."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_ranks))}
    for attempt in range(2):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
               "--master_port", str(free_port()), "--no_local_rank", str(script), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or ABORT_AT_EXIT not in proc.stderr + proc.stdout or attempt:
            return proc
    return proc
