"""train.py's error handling on a rank: project errors as one line, bugs with one traceback, no shutdown barrier."""

from __future__ import annotations

import pytest
import torch.distributed as dist
import yaml
from helpers.runner import ROOT, free_port

from neox_llama.cli import train as entry
from neox_llama.distributed import RankFailed
from neox_llama.training.trainer import Trainer, TrainingError


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    settings = yaml.safe_load((ROOT / "configs/llama3/tiny.yml").read_text())
    settings.update(vocab_size=256, tokenizer_type=None, vocab_file=None, precision="fp32", seq_length=16,
                    save=None, load=None, log_dir=str(tmp_path / "logs"))
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(settings))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    barriers = []
    monkeypatch.setattr("neox_llama.distributed.shutdown_distributed", lambda: barriers.append(1))
    yield config, barriers
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize(("error", "code", "traceback"), [
    (TrainingError("the training data ran out before train_iters"), 2, False),
    (RankFailed("rank 1 failed: x.safetensors: unreadable", 1), 2, False),
    (RuntimeError("a bug"), 1, True),
])
def test_errors_exit_non_zero_without_the_shutdown_barrier(one_rank, monkeypatch, capsys, error, code, traceback):
    config, barriers = one_rank

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Trainer, "__init__", fail)
    assert entry.main(["--config", str(config)]) == code
    assert barriers == []  # a failed rank never enters a collective on its way out
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err[-2000:]  # one line (rank 0 speaks once for a rank that failed)
    assert str(error) in (err if traceback else errors[0]), err[-2000:]
    assert err.count("Traceback (most recent call last)") == (1 if traceback else 0), err[-2000:]
