"""ZeRO-Offload through deepy.py: optimizer state (and under ZeRO-3 the weights) offloaded to CPU trains with
DeepSpeedCPUAdam and gives the same losses as without offload; NVMe offload where DeepSpeed's async_io builds."""

from __future__ import annotations

import pytest
from helpers.runner import ok
from helpers.training import deepy_train, losses, train_case

pytestmark = pytest.mark.dist

ZERO3 = ["num_gpus=2", "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]
COMMON = ["train_iters=4", "eval_interval=4", "precision=fp32"]
NVME_ZERO = ["zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]



train_case("offload-none", 2, *COMMON, *ZERO3)
train_case("offload-cpu", 2, *COMMON, *ZERO3, "zero_optimization.offload_optimizer=cpu", "zero_optimization.offload_param=cpu")


@pytest.mark.uses_cases("offload-none", "offload-cpu")
def test_cpu_offload_of_optimizer_and_weights_trains_like_no_offload(launched):
    plain = launched("offload-none").check().folder
    proc = launched("offload-cpu").check()
    offloaded = proc.folder
    assert "optimizer DeepSpeedCPUAdam, ZeRO stage 3 (optimizer state offloaded to cpu, weights offloaded to cpu)" \
        in proc.stderr
    ours, theirs = losses(offloaded), losses(plain)
    assert len(ours) == 4 and max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 1e-5, (ours, theirs)
    assert (offloaded / "ck" / "global_step4" / "weights" / "layer_001.safetensors").is_file()


def test_nvme_offload(tmp_path, corpus):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        proc = deepy_train(tmp_path / "run", corpus, *COMMON, *NVME_ZERO,
                           "zero_optimization.offload_optimizer=nvme", f"zero_optimization.nvme_path={tmp_path}")
        assert proc.returncode == 2 and "nvme needs DeepSpeed's async_io op, which cannot be built on this machine " \
            "(install libaio-dev" in proc.stderr and "Traceback" not in proc.stderr
        pytest.skip("DeepSpeed's async_io cannot be built here (no libaio): checked the clear refusal only")
    plain, nvme = tmp_path / "plain", tmp_path / "nvme"
    ok(deepy_train(plain, corpus, *COMMON, *NVME_ZERO))
    (tmp_path / "swap").mkdir()
    proc = ok(deepy_train(nvme, corpus, *COMMON, *NVME_ZERO, "zero_optimization.offload_optimizer=nvme",
                          "zero_optimization.offload_param=nvme", f"zero_optimization.nvme_path={tmp_path / 'swap'}"))
    assert "(optimizer state offloaded to nvme, weights offloaded to nvme)" in proc.stderr
    swap = tmp_path / "swap" / "zero_stage_3"  # DeepSpeed's swap folders (the files are removed at exit)
    assert (swap / "optimizer" / "rank0").is_dir() and (swap / "float32params").is_dir()
    assert max(abs(a - b) for a, b in zip(losses(nvme), losses(plain), strict=True)) <= 1e-5


def test_a_stale_build_lock_of_cpu_adam_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed half way leaves torch's lock file, on which every later offload run would wait for ever."""
    import os
    import time

    from neox_llama.utils.extensions import STALE_AFTER_S, build_lock, clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = build_lock("cpu_adam")
    assert lock.is_relative_to(tmp_path) and lock.parent.name == "cpu_adam"
    assert not clear_stale_build_lock("cpu_adam")  # no lock: nothing to do
    lock.touch()
    assert not clear_stale_build_lock("cpu_adam") and lock.exists()  # a build in progress: waited for
    old = time.time() - STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    assert clear_stale_build_lock("cpu_adam") and not lock.exists()
