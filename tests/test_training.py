"""Training through deepy.py on real ranks: loss falls, precisions, ZeRO stages, layouts, accumulation."""

from __future__ import annotations

import pytest
from train_helpers import deepy_train, losses, records, write_corpus

KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "chain")


def run_ok(tmp_path, corpus, name, *overrides, **kw):
    run = tmp_path / name
    proc = deepy_train(run, corpus, *overrides, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc


def test_one_rank_loss_falls_and_metrics_have_the_contract_keys(tmp_path, corpus):
    run, proc = run_ok(tmp_path, corpus, "bf16", "precision=bf16", "train_iters=40", "eval_interval=20",
                       "optimizer.params.lr=3e-3", "checkpoint_factor=40")
    train = records(run)
    assert len(train) == 40 and all(KEYS <= set(r) for r in train)
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.6 * sum(r["loss"] for r in train[:5]) / 5
    valid = records(run, "valid_loss")
    assert [r["step"] for r in valid] == [20, 40] and valid[1]["valid_loss"] < valid[0]["valid_loss"]
    assert all("valid_ppl" in r for r in valid)
    assert (run / "ck" / "latest").read_text() == "global_step40"
    assert (run / "ck" / "global_step40" / "config.yml").is_file()
    assert "MFU" in proc.stderr and "peak_tflops not set: measured" in proc.stderr


def test_zero_stages_match_zero_0(tmp_path, corpus):
    curves = {}
    for stage in (0, 1, 2, 3):
        run, _ = run_ok(tmp_path, corpus, f"z{stage}", f"zero_optimization.stage={stage}", "train_iters=3")
        curves[stage] = losses(run)
    for stage in (1, 2, 3):
        assert max(abs(a - b) for a, b in zip(curves[0], curves[stage], strict=True)) <= 1e-5, (stage, curves)


def test_gradient_accumulation_equals_a_bigger_micro_batch(tmp_path, corpus):
    big, _ = run_ok(tmp_path, corpus, "micro8", "train_micro_batch_size_per_gpu=8", "gradient_accumulation_steps=1",
                    "train_iters=3")
    acc, _ = run_ok(tmp_path, corpus, "acc4x2", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=4",
                    "train_iters=3")
    assert max(abs(a - b) for a, b in zip(losses(big), losses(acc), strict=True)) <= 1e-5


SAME_BATCH = ["train_iters=3", "train_batch_size=8", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=null"]


@pytest.fixture(scope="module")
def one_rank_curve(tmp_path_factory, corpus):
    run, _ = run_ok(tmp_path_factory.mktemp("one"), corpus, "one", *SAME_BATCH)
    return losses(run)


@pytest.mark.parametrize("layout", [["num_gpus=2"], ["pipe_parallel_size=2"], ["model_parallel_size=2"]],
                         ids=["dp2", "pp2", "tp2"])
def test_two_ranks_follow_the_one_rank_loss_curve(tmp_path, corpus, one_rank_curve, layout):
    two, _ = run_ok(tmp_path, corpus, "two", *SAME_BATCH, *layout)
    assert max(abs(a - b) for a, b in zip(one_rank_curve, losses(two), strict=True)) <= 1e-4, (one_rank_curve, losses(two))


def test_four_ranks_pipeline_by_data_parallel(tmp_path, corpus):
    run, proc = run_ok(tmp_path, corpus, "pp2dp2", "pipe_parallel_size=2", "num_gpus=4", "train_iters=3",
                       "train_batch_size=8", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=null")
    assert len(losses(run)) == 3 and "pp 2 x tp 1 x dp 2" in proc.stderr


def test_fp16_is_refused_on_cpu_before_launch(tmp_path, corpus):
    proc = deepy_train(tmp_path / "fp16", corpus, "precision=fp16")
    assert proc.returncode == 2 and "precision fp16 needs a GPU" in proc.stderr
    assert not (tmp_path / "fp16" / "logs").exists()


def test_tensorboard_wandb_offline_and_keep_last_checkpoints(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run, _ = run_ok(tmp_path, corpus, "sinks", "train_iters=4", "checkpoint_factor=1", "keep_last_n_checkpoints=2",
                    f"tensorboard_dir={tmp_path / 'tb'}", "use_wandb=true", "wandb_project=neox-llama-test")
    assert sorted(p.name for p in (run / "ck").glob("global_step*")) == ["global_step3", "global_step4"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((run / "logs" / "wandb").glob("offline-run-*"))


def test_early_stopping_and_best_checkpoint(tmp_path, corpus):
    run, proc = run_ok(tmp_path, corpus, "early", "train_iters=50", "eval_interval=1", "optimizer.params.lr=0",
                       "min_lr=0", "early_stopping_patience=2", "save_best=true")
    assert "early stopping: no improvement for 2 evaluations" in proc.stderr
    assert [r["step"] for r in records(run, "valid_loss")] == [1, 2, 3]
    assert (run / "ck" / "latest").read_text() == "global_step3"
    assert (run / "ck" / "best" / "metadata.json").is_file()
