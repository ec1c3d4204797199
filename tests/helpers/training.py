"""Running real training jobs through deepy.py on a small synthetic corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers.inprocess import deepy
from helpers.launches import Case, register
from helpers.runner import ROOT, free_port
from helpers.runner import run as run_command
from neox_llama.data.indexed import IndexedDatasetWriter

VOCAB = 256

SESSION_DIR: Path | None = None
"""A folder for inputs that the whole session shares (set by conftest.py's session fixture)."""
_SHARED: dict[str, Path] = {}


def shared_corpus() -> Path:
    """The session's one synthetic corpus (:func:`write_corpus` with its defaults), written on first use."""
    if "corpus" not in _SHARED:
        if SESSION_DIR is None:
            raise RuntimeError("shared_corpus() needs the test session (conftest.py sets SESSION_DIR)")
        _SHARED["corpus"] = write_corpus(SESSION_DIR / "corpus" / "chain")
    return _SHARED["corpus"]


def write_corpus(prefix: Path, docs: int = 300, seed: int = 0) -> Path:
    """Documents from a noisy deterministic chain (next = 3 x token + 1 mod 256): learnable, so loss falls."""
    rng = np.random.RandomState(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(docs):
            length = rng.randint(20, 200)
            tokens = [rng.randint(3, VOCAB)]
            for _ in range(length - 1):
                tokens.append((3 * tokens[-1] + 1) % VOCAB if rng.rand() < 0.9 else rng.randint(3, VOCAB))
            writer.add_document([*tokens, 2])
    return prefix


BASE = ["tokenizer_type=null", "vocab_file=null", f"vocab_size={VOCAB}", "make_vocab_size_divisible_by=64",
        "seq_length=32", "tensorboard_dir=null", "log_interval=1", "num_workers=0", "precision=fp32",
        "warmup_iters=2", "eval_iters=2", "eval_interval=1000", "checkpoint_factor=1000",
        "peak_tflops=1"]  # a set peak: no matmul-peak probe at start-up


def deepy_args(run: Path, corpus: Path, *overrides: str, preset: str = "configs/llama3/tiny.yml") -> list[str]:
    """``deepy.py`` arguments training the preset on ``corpus`` into ``run`` (ck/, logs/)."""
    return ["train.py", preset, *BASE, f"data_path={corpus}", f"save={run / 'ck'}", f"load={run / 'ck'}",
            f"log_dir={run / 'logs'}", f"master_port={free_port()}", *overrides]


def deepy_train(run: Path, corpus: Path, *overrides: str, preset: str = "configs/llama3/tiny.yml",
                timeout: float = 400, wait: bool = True, in_process: bool = True):
    """Train through ``python deepy.py train.py``; returns the finished (or, without wait, running) process."""
    return start_deepy(deepy_args(run, corpus, *overrides, preset=preset), timeout=timeout, wait=wait,
                       in_process=in_process)


def start_deepy(argv: list[str], *, timeout: float = 400, wait: bool = True, in_process: bool = True):
    """``python deepy.py ARGV``. Waited for, one rank trains in this process (:func:`helpers.inprocess.deepy`)
    unless ``in_process`` is off; without wait, a running process in its own session (to signal or kill)."""
    args = [sys.executable, str(ROOT / "deepy.py"), *argv]
    if not wait:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    if not in_process:
        return run_command(args, timeout=timeout, retry_abort=True)
    return deepy(*argv, cwd=ROOT)


def train_case(name: str, world: int, *overrides: str, preset: str = "configs/llama3/tiny.yml") -> Case:
    """A registered multi-rank training case (helpers.launches) on the session's corpus; its run folder is the
    outcome's folder (``records(outcome.folder)``)."""
    case = Case(name, world, "train", lambda folder: deepy_args(folder, shared_corpus(), *overrides, preset=preset))
    register(case)
    return case


def records(run: Path, key: str = "loss") -> list[dict]:
    path = run / "logs" / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if key in r]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run)]
