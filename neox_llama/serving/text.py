"""Token ids to text as they arrive: deltas that never split a character or show part of a stop string."""

from __future__ import annotations


class TextStream:
    """The text of one choice, decoded from all its ids so far (sentencepiece spacing needs the whole sequence).

    :meth:`push` returns the new text that is safe to send: a trailing incomplete UTF-8 character (``\\ufffd``)
    and any tail that could still become a stop string are held back; once a stop string appears the text ends
    just before it and :attr:`stopped` is set.
    """

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer, self.stops = tokenizer, stop_strings
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids)
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
