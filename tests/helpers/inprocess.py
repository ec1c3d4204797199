"""Command lines run inside the test process through their ``main(argv)``, as a subprocess would run them.

Starting Python and importing torch, DeepSpeed and transformers costs 3-8 s per subprocess; most tests check
what a command does (its exit status, its one-line error, the files it writes), which ``main(argv)`` does the
same in this process. Each call gets its own stdout/stderr/stdin, environment additions and working folder, and
gives back what it changed in the process (logging handlers, signal handlers, torch's thread count, the
environment). One-rank training joins the session's process group (:func:`session_group`), which torch cannot
destroy and re-create reliably in one process, so every in-process run shares it (``shutdown_distributed``
leaves a group it did not create standing).

Tests that check the launcher path itself (``deepy.py`` replacing itself with the rank, DeepSpeed's launcher,
signals, kill -9) still run real processes (:mod:`helpers.runner`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from helpers.runner import ROOT, free_port, run

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def session_group() -> None:
    """Make this process rank 0 of a one-rank gloo group (once per test session)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


class _Stream(io.TextIOWrapper):
    """A text stream over bytes (``.buffer`` works, as on a real stdout) that is never a terminal."""

    def __init__(self, data: bytes = b""):
        super().__init__(io.BytesIO(data), encoding="utf-8", errors="surrogateescape", write_through=True)

    def text(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode("utf-8", errors="replace")

    def isatty(self) -> bool:
        return False


def call(main: Callable[[list[str]], int | None], argv: list[str], *, stdin: str | None = None,
         env: dict | None = None, cwd: Path | None = None, args: list[str] | None = None) -> subprocess.CompletedProcess:
    """``main(argv)`` as a process would run it: its exit status (an uncaught exception prints its traceback
    and gives 1, ``SystemExit`` its code) and what it wrote to stdout and stderr. ``args``, the process's command
    line (``python SCRIPT ARGS``), gives ``sys.argv`` (argparse names the program after its script)."""
    out, err, inp = _Stream(), _Stream(), _Stream((stdin or "").encode("utf-8"))
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    saved_signals = {s: signal.getsignal(s) for s in _SIGNALS}
    saved_env = dict(os.environ)
    saved_threads = torch.get_num_threads()
    saved_cwd = os.getcwd()
    saved_stdin = sys.stdin
    saved_argv = sys.argv[:]
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    code: int | str | None
    try:
        sys.stdin = inp
        sys.argv[:] = [args[1] if args and len(args) > 1 else saved_argv[0], *argv]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
            except Exception:
                traceback.print_exc()
                code = 1
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
    finally:
        sys.stdin = saved_stdin
        sys.argv[:] = saved_argv
        os.chdir(saved_cwd)
        root.handlers[:], root.level = saved_logging
        for number, handler in saved_signals.items():
            signal.signal(number, handler)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        gc.collect()
    return subprocess.CompletedProcess(args or argv, code or 0, out.text(), err.text())


def tool(name: str, *argv: str, stdin: str | None = None, env: dict | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python tools/NAME ARGS`` through ``neox_llama.cli.<NAME>.main`` in this process."""
    name = name.removesuffix(".py")
    module = importlib.import_module(f"neox_llama.cli.{name}")
    return call(module.main, list(argv), stdin=stdin, env=env, cwd=cwd,
                args=[sys.executable, str(ROOT / "tools" / f"{name}.py"), *argv])


def deepy(*argv: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python deepy.py ARGS``: checked and prepared here as deepy.py does; one rank then trains in this
    process (in the session's group), several start through DeepSpeed's launcher as deepy.py would start them."""
    from neox_llama.cli import deepy as deepy_cli
    from neox_llama.cli import train

    args = [sys.executable, str(ROOT / "deepy.py"), *argv]
    prepared = call(lambda a: _prepared(deepy_cli.prepare_launch(a)), list(argv), env=env, cwd=cwd, args=args)
    launch = _PREPARED.pop("launch", None)
    if prepared.returncode != 0 or launch is None:
        return prepared
    command = launch.command
    if launch.world_size > 1:
        ran = run(command.argv, cwd=cwd or ROOT, env={**(env or {}), **command.env}, timeout=600, retry_abort=True)
    else:
        session_group()
        script_args = command.argv[command.argv.index("--config"):]
        ran = call(train.main, script_args, env={**(env or {}), **command.env}, cwd=cwd, args=command.argv)
    return subprocess.CompletedProcess(args, ran.returncode, prepared.stdout + ran.stdout, prepared.stderr + ran.stderr)


_PREPARED: dict = {}


def _prepared(result) -> int:
    if isinstance(result, int):
        return result
    _PREPARED["launch"] = result
    return 0
