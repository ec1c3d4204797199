"""The one base class of every error a user can cause (bad config, data, checkpoint, command line).

Entry points (the one runner, :mod:`neox_llama.cli.runner`) catch :class:`NeoxLlamaError`, print its message as
one line (no traceback) and exit with ``exit_code``; any other exception is a bug and is shown with its traceback.
"""

from __future__ import annotations


class NeoxLlamaError(Exception):
    """A problem the user can fix; the message names the file, key or field and what would be valid."""

    exit_code: int = 2


class TrainingError(NeoxLlamaError):
    """Training cannot go on (non-finite loss, data exhausted, bad checkpoint); the message says what to do."""
