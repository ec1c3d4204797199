"""Token ids to text as they arrive: deltas that never split a character or show part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT = 8
"""Tokens of the prompt decoded before the answer to find the text the answer adds (spaces, bytes)."""


class TextStream:
    """The text of one choice, decoded from all its ids so far (sentencepiece spacing needs the whole sequence).

    With ``context`` (a completion's prompt) the text is what the ids add after it, so prompt + text is the text of
    the whole sequence (a sentencepiece space at the start of the answer is kept, as vLLM and OpenAI keep it);
    without it, the ids alone (a chat answer, whose text starts at its first character).

    :meth:`push` returns the new text that is safe to send: a trailing incomplete UTF-8 character (``\\ufffd``)
    and any tail that could still become a stop string are held back; once a stop string appears the text ends
    just before it and :attr:`stopped` is set.
    """

    def __init__(self, tokenizer, stop_strings: list[str], context: Sequence[int] = ()):
        self.tokenizer, self.stops = tokenizer, stop_strings
        self.context = list(context)[-CONTEXT:]
        self.head = tokenizer.decode(self.context) if self.context else ""
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _decoded(self) -> str:
        if not self.context:
            return self.tokenizer.decode(self.ids)
        whole = self.tokenizer.decode(self.context + self.ids)
        return whole[len(self.head):] if whole.startswith(self.head) else self.tokenizer.decode(self.ids)

    def _text(self) -> str:
        text = self._decoded()
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        return text

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding more ids changed earlier text: wait until it settles
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        if self.stopped:
            return self._delta(text)
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":
            safe -= 1
        head = text[:safe]
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if head.endswith(stop[:k])), default=0)
        return self._delta(head[: safe - hold])

    def finish(self) -> str:
        """Whatever was held back, at the end of the choice."""
        return self._delta(self._text())

    @property
    def text(self) -> str:
        return self._text() if self.ids else ""
