"""Tokenizers behind one interface, chosen by ``tokenizer_type`` + ``vocab_file``."""

from __future__ import annotations

from pathlib import Path

from neox_llama.tokenizers.base import Tokenizer, TokenizerError

TOKENIZER_TYPES = ("SPMTokenizer", "Llama3Tokenizer", "HFTokenizer")


def build_tokenizer(tokenizer_type: str, vocab_file: str | Path) -> Tokenizer:
    """The tokenizer of ``tokenizer_type`` read from ``vocab_file``; TokenizerError names what is wrong."""
    path = Path(vocab_file)
    if not path.is_file():
        raise TokenizerError(f"{vocab_file}: tokenizer file not found (vocab_file for {tokenizer_type})")
    if tokenizer_type == "SPMTokenizer":
        from neox_llama.tokenizers.sentencepiece_tokenizer import SPMTokenizer

        return SPMTokenizer(path)
    if tokenizer_type == "Llama3Tokenizer":
        from neox_llama.tokenizers.llama3_tokenizer import Llama3Tokenizer

        return Llama3Tokenizer(path)
    if tokenizer_type == "HFTokenizer":
        from neox_llama.tokenizers.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    raise TokenizerError(f"unknown tokenizer_type {tokenizer_type!r}; use one of {', '.join(TOKENIZER_TYPES)}")


__all__ = ["TOKENIZER_TYPES", "Tokenizer", "TokenizerError", "build_tokenizer"]
