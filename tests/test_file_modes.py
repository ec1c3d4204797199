"""Files honour the umask: teammates on a shared machine can read checkpoints, configs and exports."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest
from helpers import inprocess
from helpers.runner import ROOT
from helpers.training import BASE

from neox_llama.planning.launch import free_port

pytestmark = pytest.mark.dist


@contextlib.contextmanager
def umask_set(umask):
    """This process's umask set to ``umask``, and the previous one restored."""
    previous = os.umask(umask)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_checkpoint_config_and_export_follow_the_umask(tmp_path, corpus, umask, file_mode, dir_mode):
    run = tmp_path / "run"
    train = ["train.py", "configs/llama3/tiny.yml", *BASE, f"data_path={corpus}", f"save={run / 'ck'}",
             f"log_dir={run / 'logs'}", "train_iters=1", f"master_port={free_port()}"]
    export = ["--checkpoint", str(run / "ck"), "--output", str(tmp_path / "hf")]
    with umask_set(umask):  # the one-rank run and the export in this process, under that umask
        proc = inprocess.deepy(*train, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = inprocess.tool("convert_to_hf.py", *export)
        assert proc.returncode == 0, proc.stderr[-3000:]
    modes = {**{f"ck/{k}": v for k, v in _modes(run / "ck").items()},
             **{f"logs/{k}": v for k, v in _modes(run / "logs").items()},
             **{f"hf/{k}": v for k, v in _modes(tmp_path / "hf").items()}, "hf": _modes(tmp_path)["hf"]}
    for must in ("ck/latest", "ck/global_step1/metadata.json", "ck/global_step1/config.yml",
                 "ck/global_step1/weights/layer_001.safetensors", "logs/config.yml", "hf/config.json",
                 "hf/model.safetensors"):
        assert must in modes, must
    dirs = {p for p in modes if (run / p).is_dir() or (tmp_path / p).is_dir()}
    wrong = {p: oct(m) for p, m in modes.items() if m != (dir_mode if p in dirs else file_mode) and not p.endswith(".py")}
    assert not wrong, wrong
