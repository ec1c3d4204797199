"""The one subprocess runner of the tests: commands as users run them, with the log tail shown on failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root."""

ABORT_AT_EXIT = "terminate called without an active exception"
"""DeepSpeed's rare abort at process exit (after a successful run); retried once, never other failures."""


def free_port() -> int:
    from neox_llama.planning.launch import free_port as pick

    return pick()


def run(argv: list[str], *, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300,
        retry_abort: bool = False) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion (text output); with ``retry_abort``, once more only on DeepSpeed's exit abort."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for attempt in range(2):
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if not retry_abort or proc.returncode == 0 or ABORT_AT_EXIT not in proc.stdout + proc.stderr or attempt:
            return proc
    return proc


def tail(proc: subprocess.CompletedProcess, chars: int = 4000) -> str:
    """The end of a finished process's output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{(proc.stdout or '')[-chars:]}\n--- stderr ---\n{(proc.stderr or '')[-chars:]}"


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert that ``proc`` succeeded, showing its log tail otherwise."""
    assert proc.returncode == 0, tail(proc)
    return proc


def run_deepy(*args: str, timeout: float = 300, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python deepy.py ARGS`` from the repository root (``env`` added to this process's environment)."""
    return run([sys.executable, str(ROOT / "deepy.py"), *args], cwd=cwd, timeout=timeout, env=env)


def launch(num_ranks: int, script: Path, *args: str, timeout: float = 300, retry_abort: bool = True,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """``script ARGS`` on ``num_ranks`` CPU ranks through DeepSpeed's launcher, as deepy.py starts them."""
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_ranks)), **(env or {})}
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(free_port()), "--no_local_rank", str(script), *args]
    return run(argv, env=env, timeout=timeout, retry_abort=retry_abort)
