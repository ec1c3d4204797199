"""The one text policy of every tokenizer: text that no tokenizer can encode.

A Python string can hold characters that are not valid Unicode text: lone surrogates (U+D800-U+DFFF), from a JSON
or HTTP body's ``"\\ud800"``, or from bytes that were not valid UTF-8 (Python keeps each such byte of a
command-line argument, and of a file or stdin read with ``errors="surrogateescape"``, as U+DC80-U+DCFF). None of
the tokenizer libraries takes them (sentencepiece and tokenizers raise, tiktoken repairs them itself).

- Every :class:`~neox_llama.tokenizers.base.Tokenizer` repairs them before encoding (:func:`usable_text`): each lone
  surrogate becomes U+FFFD (a surrogate pair becomes its character, as tiktoken does), and the first repair in a
  process is logged once as a warning. This is the policy for a user's prompt (the server, ``generate.py``).
- Preprocessing never gets that far: a record holding such text is malformed (:func:`unencodable_reason`),
  skipped with its file and line and counted, like any other malformed record.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
"""What each character that cannot be encoded becomes."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTES = range(0xDC80, 0xDD00)
"""Where ``errors="surrogateescape"`` puts a byte that did not decode (byte b -> U+DC00 + b)."""

USER_TEXT_ERRORS = "surrogateescape"
"""How a prompt is read from a file or stdin (``open(..., errors=USER_TEXT_ERRORS)``): a byte that is not UTF-8 is
kept, as U+DC80-U+DCFF, for the tokenizer to repair and log like any other character it cannot encode."""

_warned: list[str] = []
"""What the once-per-process warning said (empty until then)."""


def first_unencodable(text: str) -> int | None:
    """Index of the first character of ``text`` that no tokenizer can encode (a lone surrogate), or None."""
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    return found.start() if found else None


def repair(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (a surrogate pair joined into its character)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def usable_text(text: str) -> str:
    """``text`` as a tokenizer can encode it: unchanged when it is valid, else :func:`repair` ed, with a warning
    the first time in this process."""
    at = first_unencodable(text)
    if at is None:
        return text
    if not _warned:
        _warned.append(f"text to tokenize holds {describe(text[at])}: each such character is encoded as U+FFFD "
                       "(said once per process)")
        logger.warning("%s", _warned[0])
    return repair(text)


def describe(char: str) -> str:
    """What a character that cannot be encoded is, for a message: the byte it stands for, or the lone surrogate."""
    code = ord(char)
    if code in _ESCAPED_BYTES:
        return f"the byte 0x{code - 0xDC00:02x} (not valid UTF-8)"
    return f"a lone surrogate \\u{code:04x} (not valid Unicode)"


def unencodable_reason(text: str) -> str | None:
    """Why ``text`` (e.g. a string read from JSON) cannot be tokenized: the first lone surrogate and its place, or
    None when it can."""
    at = first_unencodable(text)
    if at is None:
        return None
    return f"a lone surrogate \\u{ord(text[at]):04x} at character {at + 1}, which no tokenizer can encode"


def undecodable_reason(text: str, encoding: str, first_line: int | None = None) -> str | None:
    """Why ``text``, decoded from a file in ``encoding`` with ``errors="surrogateescape"``, holds bytes that did not
    decode (the first one, at its column, and at its line counted from ``first_line`` when given), or None when every
    byte decoded."""
    at = first_unencodable(text)
    if at is None:
        return None
    code = ord(text[at])
    what = f"byte 0x{code - 0xDC00:02x}" if code in _ESCAPED_BYTES else f"character \\u{code:04x}"
    column = at - text.rfind("\n", 0, at)
    where = f"column {column}"
    if first_line is not None:
        line = first_line + text.count("\n", 0, at)
        where = f"line {line} {where}"
    return f"not valid {encoding} text ({what} at {where})"
