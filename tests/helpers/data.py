"""Small deterministic text corpora for tests that tokenize, preprocess or train on words."""

from __future__ import annotations

import numpy as np

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of 3-59 random words each, numbered (the same list for the same ``n`` and ``seed``)."""
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(WORDS, size=rng.randint(3, 60))) + f" {i}." for i in range(n)]
