"""A Hugging Face ``tokenizer.json`` (``tokenizer_type: HFTokenizer``), through the tokenizers library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from neox_llama.tokenizers.base import Tokenizer, TokenizerError

BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")


class HFTokenizer(Tokenizer):
    """bos/eos are the first of the usual names the file defines as special (added) tokens.

    As in the tokenizers library, text matching an added token always becomes that token
    (``allow_special`` makes no difference here).
    """

    name = "HFTokenizer"

    def __init__(self, tokenizer_file: str | Path):
        self.files = [Path(tokenizer_file)]
        try:
            self.tok = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the library raises a bare Exception for missing and malformed files
            raise TokenizerError(f"{tokenizer_file}: not a Hugging Face tokenizer.json ({err})") from None
        self._specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def _first(self, names: tuple[str, ...]) -> int | None:
        return next((self._specials[n] for n in names if n in self._specials), None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._first(BOS_CANDIDATES)

    @property
    def eos_id(self) -> int | None:
        return self._first(EOS_CANDIDATES)

    @property
    def starts_with_bos(self) -> bool:
        """A tokenizer.json carries its own rule: BOS first when its post-processor adds it (Meta's Llama-3 files do)."""
        ids = self.tok.encode("", add_special_tokens=True).ids
        return bool(ids) and self.bos_id is not None and ids[0] == self.bos_id

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def _encode(self, text: str, *, allow_special: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str], *, allow_special: bool) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

