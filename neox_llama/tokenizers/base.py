"""The one interface every tokenizer implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from neox_llama.errors import NeoxLlamaError
from neox_llama.tokenizers.text import usable_text


class TokenizerError(NeoxLlamaError):
    """A tokenizer file is missing or unreadable; the message names the file and what was expected."""


class Tokenizer(ABC):
    """Text <-> token ids, with the ids of the tokens training needs.

    ``eod_id`` is the token appended after each document when data is preprocessed with
    ``--append-eod``: the end-of-sequence token of the family (``</s>`` = 2 for Llama-2,
    ``<|end_of_text|>`` = 128001 for Llama-3).
    """

    name: str
    files: list[Path]
    """The files that define this tokenizer (copied into checkpoints)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_id(self) -> int | None: ...

    @property
    def eod_id(self) -> int:
        """End-of-document id appended by preprocessing."""
        if self.eos_id is None:
            raise TokenizerError(f"{self.name} has no end-of-sequence token to mark document ends")
        return self.eos_id

    @property
    def starts_with_bos(self) -> bool:
        """The start-token policy: documents and prompts begin with BOS (as Meta trains Llama-2 and Llama-3).

        True for the sentencepiece and Llama-3 tokenizers, which define BOS, and for a tokenizer.json whose own
        post-processor adds BOS (Meta's Llama-3 ``tokenizer.json``); preprocessing prepends it
        (``--prepend-bos``, the default for them), generation prepends it, and the Hugging Face export's
        tokenizer adds it through a post-processor, so every path encodes a text the same way.
        """
        return self.bos_id is not None and self.name in ("SPMTokenizer", "Llama3Tokenizer")

    def encode_document(self, text: str, *, bos: bool | None = None, allow_special: bool = False) -> list[int]:
        """Ids of ``text`` as the model sees the start of a document or prompt: BOS first when ``bos``
        (default: :attr:`starts_with_bos`)."""
        first = [self.bos_id] if (self.starts_with_bos if bos is None else bos) and self.bos_id is not None else []
        return first + self.encode(text, allow_special=allow_special)

    @property
    def pad_id(self) -> int | None:
        """Padding id, if the tokenizer defines one (padding is masked out of the loss anyway)."""
        return None

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return {}

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ids of ``text`` without bos/eos. ``allow_special`` parses special-token text (e.g. chat
        headers) as the special token; otherwise it is encoded as ordinary text.

        Text that is not valid Unicode (a lone surrogate, a byte that was not UTF-8) is repaired with U+FFFD first,
        the same way for every tokenizer (:func:`neox_llama.tokenizers.text.usable_text`)."""
        return self._encode(usable_text(text), allow_special=allow_special)

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """Ids of several texts (implementations may use the library's batched call); repaired as in :meth:`encode`."""
        return self._encode_batch([usable_text(t) for t in texts], allow_special=allow_special)

    def encode_arrays(self, texts: list[str]) -> list[Sequence[int]]:
        """Ids of several texts (special-token text as ordinary text) for writing a dataset: lists, or numpy arrays
        where the library makes them without Python ints (tiktoken's ``encode_to_numpy``); repaired as in
        :meth:`encode` (preprocessing skips such records before they get here)."""
        return self._encode_arrays([usable_text(t) for t in texts])

    # What each library implements, for text every tokenizer can encode (no lone surrogates).
    @abstractmethod
    def _encode(self, text: str, *, allow_special: bool) -> list[int]: ...

    def _encode_batch(self, texts: list[str], *, allow_special: bool) -> list[list[int]]:
        return [self._encode(t, allow_special=allow_special) for t in texts]

    def _encode_arrays(self, texts: list[str]) -> list[Sequence[int]]:
        return self._encode_batch(texts, allow_special=False)

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token or a single piece, or None."""
        return self.special_tokens.get(token)
