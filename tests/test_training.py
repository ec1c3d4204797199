"""Training through deepy.py on real ranks: loss falls, precisions, ZeRO stages, layouts, accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.training import deepy_train, losses, records, train_case

pytestmark = pytest.mark.dist

KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"}


def run_ok(tmp_path, corpus, name, *overrides, **kw):
    run = tmp_path / name
    proc = deepy_train(run, corpus, *overrides, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc


def test_one_rank_loss_falls_and_metrics_have_the_contract_keys(tmp_path, corpus):
    run, proc = run_ok(tmp_path, corpus, "bf16", "precision=bf16", "train_iters=40", "eval_interval=20",
                       "optimizer.params.lr=3e-3", "checkpoint_factor=40", "peak_tflops=null")
    train = records(run)
    assert len(train) == 40 and all(KEYS <= set(r) for r in train)
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.6 * sum(r["loss"] for r in train[:5]) / 5
    valid = records(run, "valid_loss")
    assert [r["step"] for r in valid] == [20, 40] and valid[1]["valid_loss"] < valid[0]["valid_loss"]
    assert all("valid_ppl" in r for r in valid)
    assert (run / "ck" / "latest").read_text() == "global_step40"
    assert (run / "ck" / "global_step40" / "config.yml").is_file()
    assert "MFU" in proc.stderr and "peak_tflops not set: measured" in proc.stderr


ZERO_DP2 = ["num_gpus=2", "train_iters=3", "checkpoint_factor=3", "optimizer.params.eps=1e-5",
            "zero_optimization.stage3_param_persistence_threshold=0"]  # threshold 0: ZeRO-3 partitions every tensor


for _stage in (0, 1, 2, 3):
    train_case(f"train-z{_stage}-dp2", 2, f"zero_optimization.stage={_stage}", *ZERO_DP2)


@pytest.mark.uses_cases(*(f"train-z{stage}-dp2" for stage in (0, 1, 2, 3)))
def test_zero_stages_match_zero_0_in_losses_saved_weights_and_export(tmp_path, launched):
    import transformers

    from neox_llama.checkpoint.paths import resolve_checkpoint
    from neox_llama.checkpoint.weights import read_full_state
    from neox_llama.convert.hf_export import export_to_hf

    curves, weights, runs = {}, {}, {}
    for stage in (0, 1, 2, 3):
        runs[stage] = launched(f"train-z{stage}-dp2").check().folder
        curves[stage] = losses(runs[stage])
        weights[stage] = read_full_state(resolve_checkpoint(runs[stage] / "ck"))
    assert sum(t.numel() for t in weights[0].values()) > 100_000
    for stage in (1, 2, 3):
        assert max(abs(a - b) for a, b in zip(curves[0], curves[stage], strict=True)) <= 1e-5, (stage, curves)
        assert weights[stage].keys() == weights[0].keys()
        for name, tensor in weights[0].items():
            assert weights[stage][name].shape == tensor.shape, (stage, name, weights[stage][name].shape)
            assert (weights[stage][name] - tensor).abs().max().item() <= 1e-6, (stage, name)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for stage in (0, 3):
        out = export_to_hf(runs[stage] / "ck", tmp_path / f"hf{stage}", dtype="fp32")
        with torch.no_grad():
            logits[stage] = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (logits[0] - logits[3]).abs().max().item() <= 1e-5


def test_gradient_accumulation_equals_a_bigger_micro_batch(tmp_path, corpus):
    big, _ = run_ok(tmp_path, corpus, "micro8", "train_micro_batch_size_per_gpu=8", "gradient_accumulation_steps=1",
                    "train_iters=3")
    acc, _ = run_ok(tmp_path, corpus, "acc4x2", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=4",
                    "train_iters=3")
    assert max(abs(a - b) for a, b in zip(losses(big), losses(acc), strict=True)) <= 1e-5


# clipping at 0.1 scales every step's gradients (norms here: about 1), so each layout's clipping is compared too
SAME_BATCH = ["train_iters=3", "train_batch_size=8", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=null",
              "gradient_clipping=0.1"]


@pytest.fixture(scope="module")
def one_rank_curve(tmp_path_factory, corpus):
    run, proc = run_ok(tmp_path_factory.mktemp("one"), corpus, "one", *SAME_BATCH)
    # one rank runs ZeRO 1 as stage 0 without DeepSpeed's gradient all-reduce; the 2-rank curves check it
    assert "ZeRO stage 1 (runs as 0: one rank has nothing to partition in fp32)" in proc.stderr
    return losses(run), [r["grad_norm"] for r in records(run)]


# (a plain 2-stage pipeline is covered by the compiled one here and by tests/test_parallel_parity.py)
CURVE_LAYOUTS = {"dp2": ["num_gpus=2"], "tp2": ["model_parallel_size=2"],
                 "pp2-compiled-checkpointed": ["pipe_parallel_size=2", "compile=true", "checkpoint_activations=true"]}
for _name, _layout in CURVE_LAYOUTS.items():
    train_case(f"train-curve-{_name}", 2, *SAME_BATCH, *_layout)
train_case("train-curve-pp2xdp2", 4, "pipe_parallel_size=2", "num_gpus=4", *SAME_BATCH)


@pytest.mark.parametrize("case", [f"train-curve-{name}" for name in CURVE_LAYOUTS], ids=list(CURVE_LAYOUTS))
def test_two_ranks_follow_the_one_rank_loss_curve(launched, one_rank_curve, case):
    outcome = launched(case).check()
    two = outcome.folder
    assert ("runs through torch.compile" in outcome.stderr) == ("compile" in case)
    curve, norms = one_rank_curve
    assert max(abs(a - b) for a, b in zip(curve, losses(two), strict=True)) <= 1e-4, (curve, losses(two))
    assert [r["grad_norm"] for r in records(two)] == pytest.approx(norms, rel=1e-4)


@pytest.mark.uses_cases("train-curve-pp2xdp2")
def test_four_ranks_pipeline_by_data_parallel_follow_the_one_rank_curve(launched, one_rank_curve):
    outcome = launched("train-curve-pp2xdp2").check()
    run = outcome.folder
    assert "pp 2 x tp 1 x dp 2" in outcome.stderr
    curve, norms = one_rank_curve
    assert max(abs(a - b) for a, b in zip(curve, losses(run), strict=True)) <= 1e-4, (curve, losses(run))
    assert [r["grad_norm"] for r in records(run)] == pytest.approx(norms, rel=1e-4)


def test_fp16_is_refused_on_cpu_before_launch(tmp_path, corpus):
    proc = deepy_train(tmp_path / "fp16", corpus, "precision=fp16")
    assert proc.returncode == 2 and "precision fp16 needs a GPU" in proc.stderr
    assert not (tmp_path / "fp16" / "logs").exists()


def test_tensorboard_and_wandb_hold_the_logged_values_and_keep_last_checkpoints(tmp_path, corpus, monkeypatch):
    from helpers.wandb_log import history
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    run, _ = run_ok(tmp_path, corpus, "sinks", "train_iters=4", "checkpoint_factor=1", "keep_last_n_checkpoints=2",
                    f"tensorboard_dir={tmp_path / 'tb'}", "use_wandb=true", "wandb_project=neox-llama-test")
    assert sorted(p.name for p in (run / "ck").glob("global_step*")) == ["global_step3", "global_step4"]
    logged = {r["step"]: r for r in records(run)}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert tb.keys() == logged.keys()
    assert all(abs(tb[s] - logged[s]["loss"]) <= 1e-6 * max(1.0, abs(tb[s])) for s in tb)  # TensorBoard stores float32
    assert {e.step: e.value for e in events.Scalars("lr")}.keys() == logged.keys()
    (run_file,) = (run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [r for r in history(run_file) if "loss" in r]
    assert [r["_step"] for r in rows] == sorted(logged)
    assert all(r["loss"] == logged[r["_step"]]["loss"] and r["grad_norm"] == logged[r["_step"]]["grad_norm"]
               for r in rows)


def test_best_checkpoint_holds_the_lowest_validation_loss_and_the_test_split_is_evaluated(tmp_path, corpus):
    run, proc = run_ok(tmp_path, corpus, "best", "train_iters=12", "eval_interval=2", "optimizer.params.lr=3e-3",
                       "save_best=true", "split=80,10,10", "checkpoint_factor=12")
    valid = records(run, "valid_loss")
    assert [r["step"] for r in valid] == [2, 4, 6, 8, 10, 12]
    best = min(valid, key=lambda r: r["valid_loss"])
    meta = json.loads((run / "ck" / "best" / "metadata.json").read_text())
    assert meta["step"] == best["step"] and meta["best_valid_loss"] == best["valid_loss"]
    assert not list((run / "ck").glob("*best.*"))  # swapped in whole, nothing left beside it
    from neox_llama.checkpoint.run import load_model

    assert load_model(run / "ck" / "best")[1].metadata.step == best["step"]
    assert len({r["valid_loss"] for r in valid}) == len(valid)
    # Evaluations walk on through the validation split: 6 evaluations x eval_iters 2 x 8 sequences.
    final = json.loads((run / "ck" / "global_step12" / "metadata.json").read_text())
    assert final["consumed_valid_samples"] == 6 * 2 * 8
    (test,) = records(run, "test_loss")
    assert test["step"] == 12 and 0 < test["test_loss"] < valid[0]["valid_loss"]
    assert test["test_ppl"] == pytest.approx(math.exp(test["test_loss"]))
    assert "test_loss" in proc.stderr


def test_early_stopping_follows_the_patience_rule(tmp_path, corpus):
    run, proc = run_ok(tmp_path, corpus, "early", "train_iters=50", "eval_interval=1", "optimizer.params.lr=0",
                       "min_lr=0", "early_stopping_patience=2", "save_best=true")
    assert "early stopping: no improvement for 2 evaluations" in proc.stderr
    valid = [r["valid_loss"] for r in records(run, "valid_loss")]
    best, stale, expected_stop = float("inf"), 0, None
    for step, loss in enumerate(valid, 1):
        best, stale = (loss, 0) if loss < best else (best, stale + 1)
        if stale == 2:
            expected_stop = step
            break
    assert expected_stop == len(valid) < 50
    assert (run / "ck" / "latest").read_text() == f"global_step{expected_stop}"
    assert json.loads((run / "ck" / "best" / "metadata.json").read_text())["best_valid_loss"] == min(valid)
