"""What the bad-input cases share (tests/test_bad_inputs.py and tests/helpers/bad_cases/*.py): the world they run
against, a tree hash to prove nothing changed, and ways to run a tool in this process or in one of its own.

A case is ``case_NAME(world, tmp_path) -> (completed process, text naming the culprit, [(path, tree_hash)])``: the
process must fail, print the culprit, show no traceback, and leave every listed path with its hash."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from helpers import inprocess
from helpers.data import make_docs
from helpers.runner import ROOT, run
from helpers.training import deepy_train
from neox_llama.data.indexed import IndexedDatasetWriter
from neox_llama.data.preprocess import preprocess
from neox_llama.tokenizers.train import train_sentencepiece


def tree_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for root in paths:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            digest.update(str(path).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def make_world(w: Path) -> dict:
    """In ``w``: a tokenizer, a dataset made with it, a dataset with ids beyond it, a trained checkpoint and its HF
    export. A case receives this dict (``w``: the folder, ``tok``: the sentencepiece model)."""
    (w / "corpus.txt").write_text("\n".join(make_docs(300)))
    (w / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(300)))
    tok = train_sentencepiece([w / "corpus.txt"], w / "tok", 320)
    preprocess([w / "corpus.jsonl"], str(w / "data"), "SPMTokenizer", str(tok), append_eod=True, progress=False)
    with IndexedDatasetWriter(w / "wide", np.uint16) as writer:  # as if made with a bigger tokenizer
        for i in range(200):
            writer.add_document([*range(i, i + 99), 4999])
    proc = deepy_train(w / "run", w / "data_text_document", "tokenizer_type=SPMTokenizer", f"vocab_file={tok}",
                       "vocab_size=null", "train_iters=2", "checkpoint_factor=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = inprocess.tool("convert_to_hf.py", "--checkpoint", str(w / "run/ck"), "--output", str(w / "hf"), "--dtype",
                          "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"w": w, "tok": tok}


def copy_run(world, tmp_path) -> Path:
    shutil.copytree(world["w"] / "run", tmp_path / "run")
    return tmp_path / "run"


def truncate(path: Path, keep: int = 100) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def tool(name: str, *args: str):
    """``python tools/NAME ARGS``, run in this process."""
    return inprocess.tool(name, *map(str, args))


def process(name: str, *args: str):
    """``python tools/NAME ARGS`` in a process of its own."""
    return run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], timeout=300)


def train_py(*args: str, env: dict | None = None):
    """``python train.py ARGS`` (without deepy.py), run in this process."""
    from neox_llama.cli import train

    return inprocess.call(train.main, list(map(str, args)), env=env,
                          args=[sys.executable, str(ROOT / "train.py"), *map(str, args)])


def deepy(world, run_dir: Path, *overrides: str, corpus: str = "data_text_document"):
    return deepy_train(run_dir, world["w"] / corpus, "tokenizer_type=SPMTokenizer", f"vocab_file={world['tok']}",
                       "vocab_size=null", *overrides, timeout=300)


def preprocess_tool(world: dict, inputs: Path, out: Path, *args: str):
    """``preprocess_data.py`` on ``inputs`` into ``out/o`` with the world's tokenizer, in this process."""
    return tool("preprocess_data.py", "--input", inputs, "--output-prefix", out / "o", "--tokenizer-type",
                "SPMTokenizer", "--vocab-file", world["tok"], "--no-progress", *args)


def empty_output(tmp_path: Path) -> tuple[Path, list]:
    """An empty output folder and its hash: the case proves nothing was left in it."""
    out = tmp_path / "out"
    out.mkdir()
    return out, [(out, tree_hash(out))]
