"""Resume at any layout: a checkpoint's layout-free state (fp32 masters in weights/, the optimizer's moments and step
in optimizer/) continues a run saved at one pp x tp x dp x ZeRO layout under another, with the losses of the
uninterrupted run (fp32: within the 1e-5 the parity tests hold between layouts); checkpoints hold no DeepSpeed
engine files and no zero_to_fp32.py."""

from __future__ import annotations

import json

import pytest
from helpers.launches import Case, register
from helpers.runner import ok
from helpers.training import deepy_args, deepy_train, losses, records, shared_corpus

pytestmark = pytest.mark.dist

TOLERANCE = 1e-5
"""fp32 losses of the continued steps against the uninterrupted run (the parity tests' bound between layouts)."""
COMMON = ["train_iters=4", "checkpoint_factor=2", "optimizer.params.eps=1e-5", "train_micro_batch_size_per_gpu=4"]
"""Four steps, saved after two; the parity tests' eps (1e-8 amplifies fp32 noise in near-zero gradients)."""
ZERO3 = ["zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0"]
DP1 = ["gradient_accumulation_steps=2"]
"""One data-parallel rank: the global batch of 8 samples in two micro-batches, as dp 2 reads it in one each."""
DP2 = ["num_gpus=2", "gradient_accumulation_steps=1"]

LORA = ["lora_r=4", "lora_dropout=0"]  # dropout streams cannot follow a layout change
SAVED = {  # name -> the layout the uninterrupted run trains at
    "tp2": ["model_parallel_size=2", *DP1],
    "zero3-dp2": [*DP2, *ZERO3],
    "pp2": ["pipe_parallel_size=2", *DP1],
    "lora-pp2": ["pipe_parallel_size=2", *DP1, *LORA, "finetune=true"],  # on a base its prepare trains
}
CHANGES = {  # the resumed run's name -> (the run whose global_step2 it loads, its own layout)
    "tp2-to-zero3-dp2": ("tp2", [*DP2, *ZERO3]),
    "zero3-dp2-to-zero1-offload": ("zero3-dp2", [*DP2, "zero_optimization.stage=1",
                                                 "zero_optimization.offload_optimizer=cpu"]),
    "lora-pp2-to-dp2": ("lora-pp2", [*DP2, *LORA]),  # the adapters' optimizer state moves too
}
"""Two-rank pairs: the resumed run follows the saved one in the shared 2-rank launch (cases run in order)."""
LOADS = {name: saved for name, (saved, _) in CHANGES.items()}


def _case_args(name: str, layout: list[str]):
    def prepare(folder):
        loads = LOADS.get(name)
        extra = [f"load={folder.parent / f'anywhere-{loads}' / 'run' / 'ck' / 'global_step2'}"] if loads else []
        if name.startswith("lora") and not loads:  # a fine-tune's base must exist when deepy.py checks the config
            ok(deepy_train(folder / "base", shared_corpus(), *COMMON, "train_iters=2"))
            extra = [f"load={folder / 'base' / 'ck' / 'global_step2'}"]
        return deepy_args(folder / "run", shared_corpus(), *COMMON, *layout, *extra)
    return prepare


for _name, _layout in [*SAVED.items(), *((n, lay) for n, (_, lay) in CHANGES.items())]:
    register(Case(f"anywhere-{_name}", 2, "train", _case_args(_name, _layout)))


def continued(saved, resumed) -> None:
    """The resumed run's steps 3 and 4 are the uninterrupted run's."""
    assert [r["step"] for r in records(resumed)] == [3, 4]
    want, got = losses(saved)[2:], losses(resumed)
    assert max(abs(a - b) for a, b in zip(want, got, strict=True)) <= TOLERANCE, (want, got)
    saved_samples = [r["consumed_samples"] for r in records(saved)][2:]
    assert [r["consumed_samples"] for r in records(resumed)] == saved_samples


def no_engine_files(checkpoint) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    assert {"optimizer", "metadata.json"} <= names and ({"weights", "adapter"} & names), names
    assert not [n for n in names if n.endswith(".pt") or n == "zero_to_fp32.py"], names
    assert not list(checkpoint.parent.glob("zero_to_*.py"))  # DeepSpeed's converters could not convert it
    record = json.loads((checkpoint / "optimizer" / "state.json").read_text())
    assert record["step"] == 2 and record["keys"] == ["exp_avg", "exp_avg_sq"]


@pytest.mark.uses_cases(*(f"anywhere-{n}" for n in CHANGES), *(f"anywhere-{CHANGES[n][0]}" for n in CHANGES))
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_two_rank_run_continues_at_another_two_rank_layout(launched, change):
    saved = launched(f"anywhere-{CHANGES[change][0]}").check().folder / "run"
    outcome = launched(f"anywhere-{change}").check()
    resumed = outcome.folder / "run"
    no_engine_files(saved / "ck" / "global_step2")
    assert "fp32 master weights, optimizer state, LR schedule and data position restored" in outcome.stderr
    continued(saved, resumed)


register(Case("anywhere-zero1-dp2", 2, "train", _case_args("zero1-dp2", [*DP2, "zero_optimization.stage=1"])))


def _four_ranks(folder):
    saved = folder.parent / "anywhere-zero1-dp2" / "run" / "ck" / "global_step2"
    if not saved.is_dir():  # the 2-rank launch (every suite's first, through the adapter tests) must come first
        raise AssertionError(f"{saved} does not exist yet: the 2-rank launch must run before the 4-rank one")
    return deepy_args(folder / "run", shared_corpus(), *COMMON, "pipe_parallel_size=2", "model_parallel_size=2",
                      "num_gpus=4", *DP1, f"load={saved}")


register(Case("anywhere-zero1-dp2-to-pp2xtp2", 4, "train", _four_ranks))  # joins the 4-rank launch


@pytest.mark.uses_cases("anywhere-zero1-dp2", "anywhere-zero1-dp2-to-pp2xtp2")
def test_a_data_parallel_run_continues_as_a_pipeline_of_tensor_parallel_stages(launched):
    saved = launched("anywhere-zero1-dp2").check().folder / "run"  # first: the 4-rank case loads its checkpoint
    outcome = launched("anywhere-zero1-dp2-to-pp2xtp2").check()
    assert "under pp 2 x tp 2 x dp 1" in outcome.stderr
    continued(saved, outcome.folder / "run")


BF16 = ["precision=bf16", *COMMON]


def _bf16_from_one_rank(folder):
    """The 1-rank bf16 run (trained here, in this process) and the dp 2 run that resumes its global_step2."""
    ok(deepy_train(folder / "one", shared_corpus(), *BF16, *DP1))
    return deepy_args(folder / "run", shared_corpus(), *BF16, *DP2,
                      f"load={folder / 'one' / 'ck' / 'global_step2'}")


register(Case("anywhere-bf16-dp2", 2, "train", lambda folder: deepy_args(folder / "run", shared_corpus(), *BF16,
                                                                          *DP2)))
register(Case("anywhere-bf16-one-to-dp2", 2, "train", _bf16_from_one_rank))


@pytest.mark.uses_cases("anywhere-bf16-dp2", "anywhere-bf16-one-to-dp2")
def test_bf16_continues_at_another_layout_within_that_layouts_own_difference(launched):
    """bf16 (the BF16 optimizer's fp32 masters and moments): one rank's run resumed at dp 2 stays as close to the
    uninterrupted one-rank run as a dp 2 run from the start is to it (bf16 rounds differently at each layout)."""
    outcome = launched("anywhere-bf16-one-to-dp2").check()
    one, resumed = outcome.folder / "one", outcome.folder / "run"
    from_start = launched("anywhere-bf16-dp2").check().folder / "run"
    parity = max(abs(a - b) for a, b in zip(losses(one), losses(from_start), strict=True))
    gap = max(abs(a - b) for a, b in zip(losses(one)[2:], losses(resumed), strict=True))
    assert [r["step"] for r in records(resumed)] == [3, 4]
    assert gap <= max(2 * parity, TOLERANCE), (gap, parity)  # measured: both 0.0 on a CPU that emulates bf16


@pytest.mark.uses_cases("anywhere-pp2")
def test_a_pipeline_run_continues_on_one_rank(launched, tmp_path, corpus):
    saved = launched("anywhere-pp2").check().folder / "run"
    resumed = tmp_path / "resumed"
    proc = ok(deepy_train(resumed, corpus, *COMMON, *DP1, f"load={saved / 'ck' / 'global_step2'}"))
    assert "saved at pp 2 x tp 1 x dp 1 (ZeRO" in proc.stderr and "under pp 1 x tp 1 x dp 1 (ZeRO" in proc.stderr
    continued(saved, resumed)


def test_without_its_optimizer_state_a_resumed_run_drifts(tmp_path, corpus):
    """The bound above is tight enough to see a fresh optimizer: resumed from a copy of the run's step-2 checkpoint
    the run continues exactly; with the copy's moments zeroed its losses leave the uninterrupted ones (so a setter
    that silently did nothing fails the tests above)."""
    import shutil

    from safetensors.torch import load_file, save_file

    straight = tmp_path / "straight"
    ok(deepy_train(straight, corpus, *COMMON, *DP1))
    for name, zeroed in (("copy", False), ("zeroed", True)):
        run = tmp_path / name
        shutil.copytree(straight / "ck" / "global_step2", run / "ck" / "global_step2")
        (run / "ck" / "latest").write_text("global_step2")
        if zeroed:
            for path in (run / "ck" / "global_step2" / "optimizer").glob("layer_*.safetensors"):
                save_file({k: v * 0 for k, v in load_file(str(path)).items()}, str(path))
        ok(deepy_train(run, corpus, *COMMON, *DP1))
        gap = max(abs(a - b) for a, b in zip(losses(run), losses(straight)[2:], strict=True))
        assert gap > 100 * TOLERANCE if zeroed else gap == 0.0, (name, gap)
    rebatched = tmp_path / "rebatched"  # another global batch: on from the consumed samples, said in one line
    proc = ok(deepy_train(rebatched, corpus, *COMMON, "gradient_accumulation_steps=1",
                          f"load={straight / 'ck' / 'global_step2'}"))
    assert "the checkpoint consumed 16 samples in 2 steps; this run's global batch is 4 samples: it continues " \
           "from sample 16" in proc.stderr
    assert [r["consumed_samples"] for r in records(rebatched)] == [20, 24]


def test_a_bf16_runs_weights_are_its_fp32_masters_and_export_as_such(tmp_path, corpus):
    """weights/ of a bf16 run hold the optimizer's fp32 masters (values bf16 cannot hold), so an fp32 export, a
    fine-tune or a merge reads them; convert_to_hf.py --dtype fp32 writes them unchanged, bf16 rounds them once."""
    import torch
    from helpers import inprocess
    from helpers.runner import ROOT
    from safetensors.torch import load_file

    run = tmp_path / "bf16"
    ok(deepy_train(run, corpus, "train_iters=2", "precision=bf16"))
    checkpoint = run / "ck" / "global_step2"
    assert not list((run / "ck").glob("zero_to_*.py")) and not list(checkpoint.glob("*.pt"))
    weights = load_file(str(checkpoint / "weights" / "layer_002.safetensors"))
    query = weights["attention.query.weight"]
    assert query.dtype == torch.float32 and not torch.equal(query, query.bfloat16().float())
    for dtype, exact in (("fp32", True), ("bf16", False)):
        out = tmp_path / f"hf-{dtype}"
        proc = inprocess.tool("convert_to_hf.py", "--checkpoint", str(checkpoint), "--output", str(out), "--dtype",
                              dtype, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        exported = {}
        for path in out.glob("*.safetensors"):
            exported.update(load_file(str(path)))
        q = exported["model.layers.1.self_attn.q_proj.weight"]  # layer 2 is block 1
        assert torch.equal(q.float(), query if exact else query.bfloat16().float())
