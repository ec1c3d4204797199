"""The Llama-3 tiktoken tokenizer (``tokenizer_type: Llama3Tokenizer``).

The file is Meta's ``tokenizer.model``: one ``base64-token rank`` pair per line (128,000 ranks);
256 special tokens follow, named as in Meta's reference tokenizer.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from neox_llama.tokenizers.base import Tokenizer, TokenizerError

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""Meta's pre-tokenizer split pattern for Llama-3."""

NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
NUM_SPECIALS = 256
MAX_CHARS_PER_CALL = 400_000
MAX_RUN = 25_000  # tiktoken is slow on very long runs of (non-)whitespace; Meta splits them the same way


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file, naming the line of any malformed entry."""
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise TokenizerError(f"{path}:{number}: expected 'base64-token rank', got {line[:60]!r}; "
                                         "is this a Llama-3 tokenizer.model?") from None
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read the Llama-3 tokenizer file ({err.strerror})") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tokenizer file")
    return ranks


def _split_long_runs(text: str) -> Iterator[str]:
    run, is_space, start = 0, text[:1].isspace(), 0
    for i, ch in enumerate(text):
        now = ch.isspace()
        if now != is_space:
            run, is_space = 1, now
        else:
            run += 1
            if run > MAX_RUN:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


class Llama3Tokenizer(Tokenizer):
    """bos ``<|begin_of_text|>`` 128000, eos/eod ``<|end_of_text|>`` 128001, ``<|eot_id|>`` 128009."""

    name = "Llama3Tokenizer"

    def __init__(self, model_file: str | Path):
        path = Path(model_file)
        self.files = [path]
        ranks = load_ranks(path)
        base = len(ranks)
        names = NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIALS - len(NAMED_SPECIALS))]
        self._specials = {name: base + i for i, name in enumerate(names)}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self._specials)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def bos_id(self) -> int:
        return self._specials["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self._specials["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        """End of a chat turn."""
        return self._specials["<|eot_id|>"]

    @property
    def pad_id(self) -> int:
        return self._specials["<|finetune_right_pad_id|>"]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def _pieces(self, text: str) -> Iterator[str]:
        for i in range(0, len(text), MAX_CHARS_PER_CALL):
            yield from _split_long_runs(text[i:i + MAX_CHARS_PER_CALL])

    def _encode(self, text: str, *, allow_special: bool) -> list[int]:
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for piece in self._pieces(text):
            ids += self.enc.encode(piece, allowed_special=allowed, disallowed_special=())
        return ids

    def _encode_batch(self, texts: list[str], *, allow_special: bool) -> list[list[int]]:
        if any(len(t) > MAX_RUN for t in texts):
            return [self._encode(t, allow_special=allow_special) for t in texts]
        allowed = "all" if allow_special else set()
        # On the calling thread, not tiktoken's encode_batch: that runs every call in a new thread pool, whose
        # threads start with cold regex caches (one thread each: 1.3x slower, docs/benchmarks.md). Parallelism
        # comes from preprocess workers (processes).
        return [self.enc.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]

    def _encode_arrays(self, texts: list[str]) -> list[Sequence[int]]:
        if any(len(t) > MAX_RUN for t in texts):
            return self._encode_batch(texts, allow_special=False)
        # uint32 arrays straight from tiktoken's buffer: no Python int per token (1.15x on the benchmark's corpus)
        return [self._array(t) for t in texts]

    def _array(self, text: str) -> Sequence[int]:
        return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        try:
            return self.enc.encode_single_token(token)
        except KeyError:
            return None
