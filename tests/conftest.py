"""Shared fixtures; helpers live in tests/helpers/ (the runner, training runs, assets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def write_yaml(tmp_path: Path):
    """write_yaml('name.yml', 'text') -> path of a YAML file in the test's temporary folder."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
