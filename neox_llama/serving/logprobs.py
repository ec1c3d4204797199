"""The ``logprobs`` of a response, built from the engine's token scores in OpenAI's two formats.

Completions (OpenAI's legacy API, as vLLM answers it): ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}``, one entry per token; with ``echo`` the prompt's tokens come first and the first one, which has
nothing before it, is scored ``null``. ``top_logprobs`` maps each of the ``logprobs`` most likely tokens, and the
chosen one, to its log-probability. A stop id the model chose is listed last (it ends the text, so it adds no
text), as vLLM lists it: a harness that asks for one token after a prompt always finds it there.

Chat completions: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`` for the answer's tokens
(a stop id is not part of the message and is not listed).

A token's text is the text it adds after the tokens before it (sentencepiece spaces included), so the tokens of a
choice join to its text and ``text_offset`` counts characters into it; a token that ends inside a UTF-8 character
adds nothing and the one completing it adds the character.
"""

from __future__ import annotations

from collections.abc import Sequence

from neox_llama.generation.scores import TokenScore
from neox_llama.serving.text import CONTEXT as WINDOW


class Pieces:
    """The text each pushed token adds after those before it (``context`` first, adding no text of its own)."""

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.done = len(self.ids)
        """``ids[:done]`` have given all their text; later ones end inside a character so far."""

    def _added(self, start: int, ids: list[int]) -> str | None:
        """The text ``ids`` add after ``self.ids[start:]``; None while they end inside a character."""
        base = self.ids[start:]
        before, after = self.tokenizer.decode(base), self.tokenizer.decode(base + ids)
        if not after.startswith(before) or after.endswith("\ufffd"):
            return None
        return after[len(before):]

    def push(self, token: int) -> str:
        """Append ``token``; the text it completes ("" while it ends inside a character)."""
        start = max(0, self.done - WINDOW)
        pending = [*self.ids[self.done:], token]
        base = self.ids[start:self.done]
        self.ids.append(token)
        before, after = self.tokenizer.decode(base), self.tokenizer.decode(base + pending)
        if not after.startswith(before) or after.endswith("\ufffd"):
            return ""
        self.done = len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text of tokens still inside a character at the end (as the decoder shows it)."""
        if self.done == len(self.ids):
            return ""
        start = max(0, self.done - WINDOW)
        before = self.tokenizer.decode(self.ids[start:self.done])
        after = self.tokenizer.decode(self.ids[start:])
        self.done = len(self.ids)
        return after[len(before):] if after.startswith(before) else after

    def alternative(self, token: int) -> str:
        """The text ``token`` would add here (not appended)."""
        added = self._added(max(0, len(self.ids) - WINDOW), [token])
        return added if added is not None else self.tokenizer.decode([token])


class ChoiceLogprobs:
    """One choice's log-probabilities as its tokens arrive, in the ``completion`` or ``chat`` format."""

    def __init__(self, tokenizer, prompt: list[int], kind: str, echo: bool = False):
        self.kind = kind
        self.prompt_ids = prompt
        # a completion's answer continues its prompt's text; a chat answer's text starts at its first character
        self.pieces = Pieces(tokenizer, prompt if kind == "completion" and not echo else [])
        self.entries: list[dict] = []
        self.sent = 0
        """Entries already sent in stream chunks."""
        self.offset = 0
        """Characters of the choice's text before the next token (completions' ``text_offset``)."""

    def _add(self, token: int, score: TokenScore | None, in_text: bool = True) -> str:
        """Add one token's entry (``in_text`` False: a stop id, which adds no text); the text it adds."""
        top = score.top if score is not None else []
        alternatives = [(self.pieces.alternative(t), lp) for t, lp in top]
        piece = self.pieces.push(token) if in_text else self.pieces.alternative(token)
        alternatives = [(piece if t == token else text, lp) for (t, _), (text, lp) in zip(top, alternatives,
                                                                                           strict=True)]
        if self.kind == "chat":
            self.entries.append({"token": piece, "logprob": score.logprob, "bytes": list(piece.encode()),
                                 "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(text.encode())}
                                                  for text, lp in alternatives]})
            return piece
        top = None
        if score is not None:
            top = {}
            for text, lp in [*alternatives, (piece, score.logprob)]:
                top.setdefault(text, lp)
        self.entries.append({"token": piece, "logprob": None if score is None else score.logprob, "top": top,
                             "offset": self.offset})
        if in_text:
            self.offset += len(piece)
        return piece if in_text else ""

    def echo(self, scores: list[TokenScore] | None) -> str:
        """Add the prompt's tokens (``scores``: those of its tokens after the first; None: none asked for); the
        prompt's text (the text its tokens decode to)."""
        if scores is None:
            return self.pieces.tokenizer.decode(self.prompt_ids)
        return "".join(self._add(token, scores[i - 1] if i else None) for i, token in enumerate(self.prompt_ids))

    def token(self, score: TokenScore, in_text: bool = True) -> None:
        """Add a generated token (``in_text`` False: a stop id; not listed in chat)."""
        if in_text or self.kind != "chat":
            self._add(score.token, score, in_text)

    def finish(self) -> None:
        """The end of the choice: text still held inside a character goes to the last token."""
        rest = self.pieces.flush()
        if rest and self.entries:
            self.entries[-1]["token"] += rest
            if self.kind == "chat":
                self.entries[-1]["bytes"] = list(self.entries[-1]["token"].encode())

    def _format(self, entries: list[dict]) -> dict:
        if self.kind == "chat":
            return {"content": entries, "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [e["offset"] for e in entries]}

    def whole(self) -> dict:
        return self._format(self.entries)

    def take(self) -> dict | None:
        """The entries added since the last :meth:`take` (for a stream chunk; None: none)."""
        if self.sent == len(self.entries):
            return None
        new, self.sent = self.entries[self.sent:], len(self.entries)
        return self._format(new)
