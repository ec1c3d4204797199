"""Shared fixtures; helpers live in tests/helpers/ (the runner, in-process commands, launches, training runs).

How the suite is organised (and what a new test costs): tests/README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "uses_cases(*names): the test reads these registered multi-rank cases "
                                       "(tests/helpers/launches.py); parametrized tests may name one as `case`")


def _wanted_cases(items) -> set[str]:
    wanted: set[str] = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(callspec.params.get("case"), str):
            wanted.add(callspec.params["case"])
        for marker in item.iter_markers("uses_cases"):
            wanted.update(marker.args)
    return wanted


@pytest.fixture(scope="session")
def launched(request, tmp_path_factory):
    """``launched(name)`` -> the Outcome of a registered multi-rank case; every case the selected tests use runs
    in one launch per world size, when the first of them is asked for."""
    from helpers.launches import Launcher

    return Launcher(tmp_path_factory.mktemp("launches"), _wanted_cases(request.session.items))


@pytest.fixture(scope="session", autouse=True)
def _session_dir(tmp_path_factory):
    """A folder for the inputs every module shares, written once (helpers.training.shared_corpus)."""
    from helpers import training

    training.SESSION_DIR = tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def corpus():
    """The synthetic token corpus (helpers.training.write_corpus) that the training tests share."""
    from helpers.training import shared_corpus

    return shared_corpus()


@pytest.fixture
def write_yaml(tmp_path: Path):
    """write_yaml('name.yml', 'text') -> path of a YAML file in the test's temporary folder."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


# --- shared fixtures moved from test modules ---


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory):
    """A random checkpoint ``ck`` with its own tokenizer ``tok.model`` and a 10-document dataset ``docs`` split 8,1,1
    (helpers.evaluation): test_evaluate, test_batched_generation."""
    from helpers.evaluation import evaluation_checkpoint

    return evaluation_checkpoint(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="session")
def finetune_setup():
    """(folder, instruction records, sentencepiece tokenizer, random base checkpoint of the tiny preset)
    (helpers.finetune): test_finetune, test_adapter_finetune. Runs write into folders of their own."""
    from helpers.finetune import shared_setup

    return shared_setup()
