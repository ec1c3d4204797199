"""No hung jobs: a rank that fails stops the run quickly, with the failing file named, on every layout."""

from __future__ import annotations

import time

import pytest
from helpers.runner import ROOT, launch
from helpers.training import BASE, deepy_train, write_corpus

from neox_llama.checkpoint.paths import layer_file, resolve_checkpoint
from neox_llama.config.loading import dump_raw_text, load_raw

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "chain")


def test_a_corrupt_weight_file_read_by_stage_1_only_stops_every_rank_within_120_s(tmp_path, corpus):
    base = tmp_path / "base"
    proc = deepy_train(base, corpus, "train_iters=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = layer_file(resolve_checkpoint(base / "ck"), 4)  # the output head: on the last pipeline stage only
    head.write_bytes(head.read_bytes()[:100])
    # Launched as a user's own launcher (torchrun, slurm) would, without deepy.py: its pre-launch check would name the
    # file before any rank starts; here the ranks themselves must stop, all of them, quickly.
    raw, _ = load_raw([ROOT / "configs/llama3/tiny.yml"],
                      [*BASE, f"data_path={corpus}", "train_iters=2", "finetune=true", f"load={base / 'ck'}",
                       f"save={tmp_path / 'tuned/ck'}", f"log_dir={tmp_path / 'tuned/logs'}", "pipe_parallel_size=2",
                       "distributed_timeout_minutes=30"])
    config = tmp_path / "merged.yml"
    config.write_text(dump_raw_text(raw))
    start = time.monotonic()
    proc = launch(2, ROOT / "train.py", "--config", str(config), timeout=120)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 120, out[-3000:]
    assert "layer_004.safetensors: unreadable weight file" in out, out[-3000:]
    assert "[rank 0] ERROR train: rank 1 failed:" in out  # rank 0 left with rank 1's message, not by a timeout
    assert "Traceback" not in out

