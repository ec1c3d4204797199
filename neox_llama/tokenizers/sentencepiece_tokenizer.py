"""Llama-2 style sentencepiece models (``tokenizer_type: SPMTokenizer``)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from neox_llama.tokenizers.base import Tokenizer, TokenizerError


class SPMTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file: bos 1, eos 2 (= end of document), unk 0 for Llama-2."""

    name = "SPMTokenizer"

    def __init__(self, model_file: str | Path):
        self.files = [Path(model_file)]
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model_file}: not a sentencepiece model ({err})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return _or_none(self.sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _or_none(self.sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _or_none(self.sp.pad_id())

    @property
    def special_tokens(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def _encode(self, text: str, *, allow_special: bool) -> list[int]:
        if allow_special:
            return self._encode_with_specials(text)
        return self.sp.encode(text)

    def _encode_batch(self, texts: list[str], *, allow_special: bool) -> list[list[int]]:
        if allow_special:
            return [self._encode_with_specials(t) for t in texts]
        return self.sp.encode(texts, num_threads=1)

    def _encode_with_specials(self, text: str) -> list[int]:
        # sentencepiece never parses control pieces from text; split on them ourselves.
        specials = {k: v for k, v in self.special_tokens.items() if k}
        ids: list[int] = []
        start = 0
        while start < len(text):
            hits = [(text.find(tok, start), tok) for tok in specials if text.find(tok, start) >= 0]
            if not hits:
                ids += self.sp.encode(text[start:])
                break
            pos, tok = min(hits)
            if pos > start:
                ids += self.sp.encode(text[start:pos])
            ids.append(specials[tok])
            start = pos + len(tok)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        piece = self.sp.piece_to_id(token)
        return None if piece == self.sp.unk_id() and token != self.sp.id_to_piece(piece) else piece


def _or_none(value: int) -> int | None:
    return None if value < 0 else value
