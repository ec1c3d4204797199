"""Shared test helpers: the repository root, temporary YAML files, and running deepy.py as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    from neox_llama.launcher import free_port as pick

    return pick()


def run_deepy(*args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python deepy.py ARGS`` from the repository root; returns the finished process (text output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
