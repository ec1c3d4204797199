"""The one runner every command line goes through: ``tools/*.py``, ``deepy.py``, ``train.py`` and the ``neox-*``
console scripts.

A command's body is ``main(argv) -> int`` that raises :class:`~neox_llama.errors.NeoxLlamaError` for anything
the user can fix. :func:`command` wraps it so that

* a project error is printed as ``PROG: error: MESSAGE`` on stderr (one line; an error holding several problems,
  such as a ``ConfigError``, one such line per problem) and the process exits with that error's ``exit_code``;
* Ctrl-C (``KeyboardInterrupt``) is ``PROG: interrupted`` on stderr and exit status 130, no traceback;
* ``SystemExit`` (argparse's usage errors, ``--help``) passes through unchanged, and any other exception is a bug
  and keeps its traceback.

The wrapped ``main`` takes ``argv`` (a test calls it in-process) or, without it, reads ``sys.argv[1:]``, so the
same function is the console script's entry point::

    @command("merge_lora.py")
    def main(argv: list[str]) -> int:
        ...

    console_main = main  # neox-merge-lora (pyproject.toml [project.scripts])
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from neox_llama.errors import NeoxLlamaError

Body = Callable[[list[str]], "int | None"]
"""A command's body: the arguments after the program name in, an exit status out (None: 0)."""

INTERRUPTED = 130
"""The exit status after Ctrl-C (128 + SIGINT), as a shell reports a process that SIGINT ended."""


def report(prog: str, err: NeoxLlamaError) -> int:
    """Print ``err`` as ``PROG: error: ...`` (a line per line of its message) and give its exit status."""
    for line in str(err).splitlines() or [type(err).__name__]:
        print(f"{prog}: error: {line}", file=sys.stderr)
    return err.exit_code


def run(body: Body, argv: list[str] | None, prog: str, interrupted: str = "interrupted") -> int:
    """``body(argv)`` with project errors and Ctrl-C turned into one line on stderr and an exit status."""
    try:
        code = body(list(sys.argv[1:] if argv is None else argv))
    except NeoxLlamaError as err:
        return report(prog, err)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    return 0 if code is None else code


def command(prog: str, *, interrupted: str = "interrupted") -> Callable[[Body], Callable[..., int]]:
    """Decorate a command's body: ``main(argv=None) -> int`` run through :func:`run` as program ``prog``
    (the name its messages start with, e.g. ``"generate.py"``); ``interrupted`` is what Ctrl-C prints after it."""

    def wrap(body: Body) -> Callable[..., int]:
        @functools.wraps(body)
        def main(argv: list[str] | None = None) -> int:
            return run(body, argv, prog, interrupted)

        main.prog = prog  # type: ignore[attr-defined]
        main.runs_through_runner = True  # type: ignore[attr-defined]
        return main

    return wrap


def is_command(obj: object) -> bool:
    """Whether ``obj`` is a ``main`` built by :func:`command` (the console-script test checks every entry point)."""
    return callable(obj) and getattr(obj, "runs_through_runner", False) is True
