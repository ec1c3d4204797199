"""Checkpoints: exact resume after kill -9, layout changes, SIGTERM, atomic `latest`, fine-tuning, NaN stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
from helpers.runner import ok
from helpers.training import deepy_train, losses, records, train_case

pytestmark = pytest.mark.dist



def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.time() - start > timeout:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


KILL_LAYOUTS = {"1rank": [], "pp2": ["pipe_parallel_size=2"],
                "zero3-dp2": ["num_gpus=2", "zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]}
KILL_COMMON = ["train_iters=24", "checkpoint_factor=4"]
for _name in ("pp2", "zero3-dp2"):  # the uninterrupted runs: cases of the shared 2-rank launch
    train_case(f"resume-straight-{_name}", 2, *KILL_COMMON, *KILL_LAYOUTS[_name])


@pytest.mark.uses_cases(*(f"resume-straight-{name}" for name in KILL_LAYOUTS if name != "1rank"))
@pytest.mark.parametrize("layout", list(KILL_LAYOUTS))
def test_kill_9_and_resume_gives_the_same_losses(tmp_path, corpus, launched, layout):
    common = [*KILL_COMMON, *KILL_LAYOUTS[layout]]
    if layout == "1rank":
        straight = tmp_path / "straight"
        ok(deepy_train(straight, corpus, *common))
    else:
        straight = launched(f"resume-straight-{layout}").check().folder
    broken = tmp_path / "broken"
    proc = deepy_train(broken, corpus, *common, wait=False)  # real processes: killed with -9 below
    latest = broken / "ck" / "latest"
    wait_for(latest.exists, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # as soon as the first checkpoint is complete
    proc.wait()
    killed_at = int(latest.read_text().removeprefix("global_step"))
    assert killed_at < 24 and killed_at % 4 == 0
    resumed = ok(deepy_train(broken, corpus, *common))
    assert "resumed from" in resumed.stderr and f"at step {killed_at}" in resumed.stderr
    assert [r["step"] for r in records(broken)] == list(range(1, 25))
    assert losses(broken) == losses(straight)  # exactly equal


SAVED_LAYOUTS = {"pp2-to-pp1": ["pipe_parallel_size=2"], "tp2-to-tp1": ["model_parallel_size=2"]}
for _name, _saved in SAVED_LAYOUTS.items():
    train_case(f"resume-saved-{_name}", 2, "train_iters=2", "eval_interval=2", *_saved)


@pytest.mark.uses_cases(*(f"resume-saved-{name}" for name in SAVED_LAYOUTS))
@pytest.mark.parametrize("change", list(SAVED_LAYOUTS))
def test_a_checkpoint_without_optimizer_state_loads_its_weights_at_another_layout(tmp_path, corpus, launched, change):
    """A checkpoint saved before the optimizer state was layout-free (2026-12-07: no optimizer/) still continues at
    another layout from its weights, with a fresh optimizer, and says so."""
    first = launched(f"resume-saved-{change}").check().folder
    old = tmp_path / "old"
    shutil.copytree(first / "ck", old)
    for checkpoint in old.glob("global_step*"):
        shutil.rmtree(checkpoint / "optimizer")
    second = tmp_path / "second"
    proc = ok(deepy_train(second, corpus, "train_iters=2", "eval_interval=2", f"load={old}"))
    assert "optimizer state NOT restored" in proc.stderr and "nothing to train" in proc.stderr
    before, after = records(first, "valid_loss")[-1], records(second, "valid_loss")[-1]
    assert before["step"] == after["step"] == 2
    assert abs(before["valid_loss"] - after["valid_loss"]) <= 1e-5, (before, after)


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus):
    run = tmp_path / "run"
    proc = deepy_train(run, corpus, "train_iters=100000", wait=False)
    metrics = run / "logs" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    step = int((run / "ck" / "latest").read_text().removeprefix("global_step"))
    assert step >= 3 and "received SIGTERM" in out
    assert json.loads((run / "ck" / f"global_step{step}" / "metadata.json").read_text())["step"] == step


def _partial_save(ck):
    """A global_stepN folder that a save has started but not finished (its metadata is written last)."""
    if not ck.is_dir():
        return None
    for folder in ck.glob("global_step*"):
        if not (folder / "metadata.json").exists():
            return folder
    return None


def test_a_save_interrupted_inside_never_becomes_latest(tmp_path, corpus):
    """Stop the run while a save is provably half done (frozen with SIGSTOP, then checked), then kill -9 it."""
    run = tmp_path / "run"
    ck = run / "ck"
    proc = deepy_train(run, corpus, "train_iters=100000", "checkpoint_factor=1", wait=False)
    interrupted = None
    deadline = time.time() + 300
    while interrupted is None:
        assert proc.poll() is None and time.time() < deadline, "no save was caught half way"
        if (ck / "latest").exists() and _partial_save(ck) is not None:  # a save after the first complete one
            os.killpg(proc.pid, signal.SIGSTOP)  # frozen: nothing can change on disk now
            interrupted = _partial_save(ck)
            if interrupted is None:
                os.killpg(proc.pid, signal.SIGCONT)  # it finished in between: catch the next one
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    tag = (ck / "latest").read_text()
    assert tag != interrupted.name
    meta = json.loads((ck / tag / "metadata.json").read_text())
    assert meta["tag"] == tag and meta["step"] < int(interrupted.name.removeprefix("global_step"))
    resumed = ok(deepy_train(run, corpus, f"train_iters={meta['step'] + 1}", "checkpoint_factor=1"))
    assert f"at step {meta['step']}" in resumed.stderr
    assert (ck / "latest").read_text() == f"global_step{meta['step'] + 1}"
    assert not interrupted.exists() or (interrupted / "metadata.json").exists()  # the partial folder was pruned


def test_finetune_loads_weights_only(tmp_path, corpus):
    base = tmp_path / "base"
    ok(deepy_train(base, corpus, "train_iters=30", "optimizer.params.lr=3e-3"))
    tuned = tmp_path / "tuned"
    proc = ok(deepy_train(tuned, corpus, "train_iters=2", "finetune=true", f"load={base / 'ck'}"))
    assert "fine-tuning from the weights of" in proc.stderr
    assert [r["step"] for r in records(tuned)] == [1, 2]  # a fresh run: step 0, new optimizer
    assert losses(tuned)[0] < losses(base)[0] - 1.0  # it starts from the trained weights


def test_finetune_from_a_missing_checkpoint_is_an_error(tmp_path, corpus):
    proc = deepy_train(tmp_path / "t", corpus, "train_iters=2", "finetune=true", f"load={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "checkpoint directory not found (finetune needs a checkpoint)" in proc.stderr
    assert "nothing was started" in proc.stderr


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, corpus):
    proc = deepy_train(tmp_path / "nan", corpus, "train_iters=50", "optimizer.params.lr=1e30", "warmup_iters=0",
                       "gradient_clipping=0")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "stopping (no checkpoint was saved)" in proc.stderr and "at step" in proc.stderr


def test_rerunning_a_finished_job_logs_its_evaluation_once_and_quietly(tmp_path, corpus):
    run = tmp_path / "run"
    ok(deepy_train(run, corpus, "train_iters=2", "eval_interval=2"))
    for _ in range(2):
        again = ok(deepy_train(run, corpus, "train_iters=2", "eval_interval=2"))
        assert "nothing to train" in again.stderr and "valid_loss" in again.stderr
        assert "_load_legacy_checkpoint" not in again.stdout + again.stderr  # DeepSpeed's stray print is gone
    assert [r["step"] for r in records(run, "valid_loss")] == [2]


def test_one_rank_bf16_resumes_exactly(tmp_path, corpus):
    """One bf16 rank steps with DeepSpeed's BF16_Optimizer (fp32 master weights and gradient accumulation; the other
    resume tests run fp32 on a CPU without native bf16): its state resumes exactly as well."""
    import shutil

    common = ["precision=bf16", "train_iters=4", "checkpoint_factor=2"]
    straight = tmp_path / "straight"
    ok(deepy_train(straight, corpus, *common))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "ck" / "global_step2", resumed / "ck" / "global_step2")
    (resumed / "ck" / "latest").write_text("global_step2")
    proc = ok(deepy_train(resumed, corpus, *common))
    assert "at step 2" in proc.stderr
    assert [r["step"] for r in records(resumed)] == [3, 4]
    assert losses(resumed) == losses(straight)[2:]  # exactly equal


def test_a_checkpoint_saved_before_the_layout_free_optimizer_state_resumes_exactly(tmp_path, corpus, monkeypatch):
    """A checkpoint in the format written before 2026-12-07 (DeepSpeed's engine files, no optimizer/; saved here by
    the same code path the trainer still takes when the optimizer has no per-parameter view) resumes exactly at its
    own layout through DeepSpeed's files; and the save directory keeps no zero_to_fp32.py."""
    import shutil

    from neox_llama.training import checkpointing

    common = ["train_iters=4", "checkpoint_factor=2"]
    old = tmp_path / "old"
    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.OptimizerView, "of", classmethod(lambda cls, engine: None))
        ok(deepy_train(old, corpus, *common))
    saved = old / "ck" / "global_step2"
    assert not (saved / "optimizer").exists() and list(saved.glob("*model_states.pt"))
    resumed = tmp_path / "resumed"
    shutil.copytree(saved, resumed / "ck" / "global_step2")
    (resumed / "ck" / "latest").write_text("global_step2")
    (resumed / "ck" / "zero_to_fp32.py").write_text("# as DeepSpeed left it\n")
    proc = ok(deepy_train(resumed, corpus, *common))
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert losses(resumed) == losses(old)[2:]  # exactly equal
    assert (resumed / "ck" / "global_step4" / "optimizer").is_dir()  # saved in today's format
    assert not (resumed / "ck" / "zero_to_fp32.py").exists() and not (old / "ck" / "zero_to_fp32.py").exists()
