"""Pipeline (2 stages) and tensor parallel (2 ranks) on real gloo ranks equal one device: loss and one step."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.launches import Case, register
from helpers.runner import ROOT
from safetensors.torch import load_file
from workers.parallel_step import fixed_batch

from neox_llama.config import load_config
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss, token_weights
from neox_llama.training.engine import parameter_groups

pytestmark = pytest.mark.dist

COMMON = ["vocab_size=256", "seq_length=16", "precision=fp32", "train_batch_size=8", "train_micro_batch_size_per_gpu=2",
          "gradient_accumulation_steps=null", "zero_optimization.stage=1", "gradient_clipping=0.2", "seed=11",
          "optimizer.params.lr=1e-3", "optimizer.params.eps=1e-5"]  # Llama-2 eps; 1e-8 amplifies fp32 noise in near-zero grads


def reference(preset: str, overrides: list[str]):
    """Loss on the fixed batch and weights after one AdamW step, on one device without DeepSpeed."""
    cfg = load_config([ROOT / preset], COMMON + overrides)
    args = LlamaArgs.from_config(cfg)
    model = build_model(args)
    initial = {n: t.detach().clone() for n, t in model.named_parameters()}
    ids, mask = fixed_batch(args.vocab_size, cfg.derived.train_batch_size, cfg.seq_length)
    loss = CausalLMLoss()(model(ids[:, :-1]), (ids[:, 1:], token_weights(mask, mask.sum())))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clipping)
    p = cfg.optimizer.params
    opt = torch.optim.AdamW(parameter_groups(model, p.weight_decay), lr=p.lr, betas=tuple(p.betas), eps=p.eps)
    opt.step()
    return loss.item(), {n: t.detach() for n, t in model.named_parameters()}, initial


LAYOUTS = {
    "pp2": (2, "configs/llama3/tiny.yml", ["pipe_parallel_size=2"]),
    "tp2": (2, "configs/llama3/tiny.yml", ["model_parallel_size=2"]),
    "pp2-tied": (2, "configs/llama3.2/tiny.yml", ["pipe_parallel_size=2"]),
    "tp2-tied": (2, "configs/llama3.2/tiny.yml", ["model_parallel_size=2"]),
    "pp2xtp2-tied": (4, "configs/llama3.2/tiny.yml", ["pipe_parallel_size=2", "model_parallel_size=2"]),
    "pp2-checkpointed": (2, "configs/llama3/tiny.yml", ["pipe_parallel_size=2", "checkpoint_activations=true"]),
    "tp2-checkpointed": (2, "configs/llama3/tiny.yml", ["model_parallel_size=2", "checkpoint_activations=true"]),
    "dp2": (2, "configs/llama3/tiny.yml", ["num_gpus=2"]),
    "zero3-dp2-tied": (2, "configs/llama3.2/tiny.yml", ["num_gpus=2", "zero_optimization.stage=3",
                                                        "zero_optimization.stage3_param_persistence_threshold=0"]),
    "pp2xdp2": (4, "configs/llama3/tiny.yml", ["pipe_parallel_size=2"]),
    "tp2xdp2-zero3": (4, "configs/llama3/tiny.yml", ["model_parallel_size=2", "zero_optimization.stage=3",
                                                     "zero_optimization.stage3_param_persistence_threshold=0"]),
}
for _name, (_ranks, _preset, _layout) in LAYOUTS.items():
    register(Case(f"parity-{_name}", _ranks, "parallel_step",
                  lambda folder, p=_preset, lay=_layout: [folder, ROOT / p, *COMMON, *lay]))


@pytest.mark.parametrize("case", [f"parity-{name}" for name in LAYOUTS], ids=list(LAYOUTS))
def test_parallel_layouts_match_one_device(launched, case):
    ranks, preset, layout = LAYOUTS[case.removeprefix("parity-")]
    tmp_path = launched(case).check().folder
    ref_loss, ref_weights, ref_initial = reference(preset, [])
    merged: dict[str, torch.Tensor] = {}
    wrote: dict[int, list[int]] = {}
    for rank in range(ranks):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        wrote[rank] = result["wrote"]
        for name, tensor in result["initial"].items():  # built sharded, initialised exactly as one device
            assert torch.equal(tensor, ref_initial[name]), (rank, name)
        assert abs(result["loss"] - ref_loss) <= 1e-5, (rank, result["loss"], ref_loss)
        for name, tensor in result["weights"].items():
            if name in merged:  # replicated (e.g. the tied embedding on both pipeline ends) must agree
                assert torch.allclose(merged[name], tensor, atol=1e-6), name
            merged[name] = tensor
    assert set(merged) == set(ref_weights)
    worst = max((merged[n] - ref_weights[n]).abs().max().item() for n in ref_weights)
    assert worst <= 1e-5, worst
    # Saved as disjoint whole-layer files, shared out over the data-parallel ranks, equal to the gathered weights.
    files = [i for layers in wrote.values() for i in layers]
    assert len(files) == len(set(files)) and set(files) == {int(n.split(".")[0]) for n in merged}, wrote
    dp = ranks // ((2 if "pipe_parallel_size=2" in layout else 1) * (2 if "model_parallel_size=2" in layout else 1))
    assert len([rank for rank, layers in wrote.items() if layers]) >= dp * (2 if "pipe_parallel_size=2" in layout else 1)
    for index in files:  # every data-parallel replica (and every stage) wrote some layers
        saved = load_file(str(tmp_path / "saved" / "weights" / f"layer_{index:03d}.safetensors"))
        assert {f"{index}.{n}" for n in saved} == {n for n in merged if n.split(".")[0] == str(index)}, index
        assert all(torch.equal(t.float(), merged[f"{index}.{n}"]) for n, t in saved.items()), index
    for rank in range(ranks):  # ZeRO-3 is built partitioned over dp: each rank holds 1/dp, never the whole model
        held = tmp_path / f"rank{rank}.held.json"
        if held.exists():
            numbers = json.loads(held.read_text())
            assert numbers["held"] <= numbers["total"] / dp + 1024, numbers  # total: this rank's tp shard
            assert numbers["meta"] == ["meta"], numbers
