"""Texts every tokenizer must round-trip, and Meta's own Llama-3 encoding to compare ids against."""

from __future__ import annotations

import re
import zipfile

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from helpers.assets import CACHE, asset

TEXTS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "  two leading spaces and\ttabs\t",
    "line one\nline two\n\n\nthree newlines",
    "\n starts with a newline",
    "digits 1234567890 and 3.14159, 1,000,000",
    "unicode: café naïve 東京 😀 Ελληνικά ﬁ",
    "code: def f(x):\n    return x**2  # comment",
    "special tokens as text: <|begin_of_text|> <s> </s> <|eot_id|>",
    "",
    " ",
    "'s 're I'M shouting",
]


def llama3_reference() -> tiktoken.Encoding:
    """Meta's encoding built from the wheel's own tokenizer.py (pattern and special names parsed from source)."""
    path = asset("llama3-tokenizer")
    wheel = next((CACHE / "downloads").glob("llama_models-*.whl"))
    source = zipfile.ZipFile(wheel).read("llama_models/llama3/tokenizer.py").decode()
    pattern = re.search(r'pat_str = r"(.+?)"  #', source).group(1)
    named = re.findall(r'^\s+"(<\|[a-z_0-9]+\|>)",', source[source.index("special_tokens = ["):], re.M)
    ranks = load_tiktoken_bpe(str(path))
    names = named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]
    specials = {name: len(ranks) + i for i, name in enumerate(names)}
    return tiktoken.Encoding(name="ref", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
