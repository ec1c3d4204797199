"""A case run on every rank by tests/workers/cases.py for tests/test_parallel_parity.py (one launch per world size).

Builds the tiny model at the layout given by the overrides, evaluates the loss on a fixed batch,
takes one optimizer step, and writes this rank's full (tensor-parallel gathered) weights, and saves the layout-free
weight files as a checkpoint does (recording which layers this rank wrote).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from neox_llama.config import load_config
from neox_llama.distributed import init_distributed
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss
from neox_llama.parallel.pipeline import rank_layers
from neox_llama.parallel.topology import ParallelState
from neox_llama.training.checkpointing import full_tensor, gathered, save_layer_weights
from neox_llama.training.engine import setup_engine
from neox_llama.training.step import make_global_batch, run_global_batch


def fixed_batch(vocab: int, batch: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    mask = torch.ones(batch, seq)
    mask[0, seq // 2:] = 0  # some padding, so valid-token normalisation matters
    return ids, mask


def full_weights(model: torch.nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """This rank's layers as full tensors, gathered as checkpoints gather them (ZeRO-3: a layer at a time)."""
    out = {}
    for index, layer in rank_layers(model, state).items():
        with gathered(list(layer.parameters())):
            out.update({f"{index}.{name}": full_tensor(param, state).float() for name, param in layer.named_parameters()})
    return out


def run(argv: list[str]) -> None:
    out_dir, config_file, overrides = Path(argv[0]), argv[1], argv[2:]
    cfg = load_config([config_file], overrides, world_size=int(os.environ["WORLD_SIZE"]))
    info = init_distributed("cpu")
    state = ParallelState(cfg.pipe_parallel_size, cfg.model_parallel_size)
    args = LlamaArgs.from_config(cfg)
    training_engine = setup_engine(cfg, args, state)
    engine = training_engine.engine
    if cfg.zero_optimization.stage == 3:  # built partitioned: no rank ever held the whole model
        sizes = [p.ds_tensor.numel() for p in engine.module.parameters()]
        # and a meta-device build after zero.Init (checkpoint shape checks) still allocates nothing
        meta = {p.device.type for p in build_model(args, device="meta", initialize=False).parameters()}
        (out_dir / f"rank{info.rank}.held.json").write_text(json.dumps(
            {"held": sum(sizes), "total": sum(p.ds_numel for p in engine.module.parameters()), "meta": sorted(meta)}))
    d = cfg.derived
    ids, mask = fixed_batch(args.vocab_size, d.train_batch_size, cfg.seq_length)
    micro = d.train_micro_batch_size_per_gpu
    # This data-parallel rank's micro-batches of the global batch, through the trainer's own step functions.
    mine = [(ids[s:s + micro], mask[s:s + micro]) for s in range(0, len(ids), micro)][state.dp_rank::d.data_parallel_size]
    samples = [{"input_ids": x[:, :-1], "labels": x[:, 1:], "loss_mask": m,
                "position_ids": torch.arange(cfg.seq_length).expand(len(x), -1)} for x, m in mine]
    batch = make_global_batch(samples, training_engine, info.device)
    loss_fn = CausalLMLoss(training_engine.factory)
    initial = full_weights(engine.module, state)  # layout-free initialisation: equal to the 1-rank build, exactly
    before = float(run_global_batch(training_engine, batch, loss_fn, train=False))
    engine.train()
    run_global_batch(training_engine, batch, loss_fn, train=True)
    weights = full_weights(engine.module, state)
    wrote = save_layer_weights(engine.module, state, out_dir / "saved")  # the checkpoint's layout-free weights
    torch.save({"loss": before, "weights": weights, "wrote": wrote, "initial": initial}, out_dir / f"rank{info.rank}.pt")
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps({"loss": before}))
