"""A case run on every rank by tests/workers/cases.py for the LoRA and Adapter layout tests.

Loads a base checkpoint into the tiny model at the layout given by the overrides, attaches LoRA as the
trainer does (setup_engine), takes three optimizer steps on fixed batches (the loss before each step is
recorded, and the loss with the adapters freshly attached), and writes this rank's full weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from workers.parallel_step import fixed_batch, full_weights

from neox_llama.config import load_config
from neox_llama.distributed import init_distributed
from neox_llama.model.args import LlamaArgs
from neox_llama.model.loss import CausalLMLoss
from neox_llama.parallel.topology import ParallelState
from neox_llama.training.engine import setup_engine
from neox_llama.training.load_plan import LoadPlan
from neox_llama.training.step import make_global_batch, run_global_batch

STEPS = 3


def run(argv: list[str]) -> None:
    out_dir, base, config_file, overrides = Path(argv[0]), Path(argv[1]), argv[2], argv[3:]
    cfg = load_config([config_file], overrides, world_size=int(os.environ["WORLD_SIZE"]))
    info = init_distributed("cpu")
    state = ParallelState(cfg.pipe_parallel_size, cfg.model_parallel_size)
    args = LlamaArgs.from_config(cfg)
    training_engine = setup_engine(cfg, args, state,
                                   plan=LoadPlan(weights=base, zero_stage=cfg.derived.engine_zero_stage))
    engine = training_engine.engine
    d = cfg.derived
    micro = d.train_micro_batch_size_per_gpu
    loss_fn = CausalLMLoss(training_engine.factory)
    losses = []
    for _ in range(STEPS):
        ids, mask = fixed_batch(args.vocab_size, d.train_batch_size, cfg.seq_length)  # the same batch: loss falls
        mine = [(ids[s:s + micro], mask[s:s + micro])
                for s in range(0, len(ids), micro)][state.dp_rank::d.data_parallel_size]
        samples = [{"input_ids": x[:, :-1], "labels": x[:, 1:], "loss_mask": m,
                    "position_ids": torch.arange(cfg.seq_length).expand(len(x), -1)} for x, m in mine]
        batch = make_global_batch(samples, training_engine, info.device)
        losses.append(float(run_global_batch(training_engine, batch, loss_fn, train=False)))
        engine.train()
        run_global_batch(training_engine, batch, loss_fn, train=True)

    weights = full_weights(engine.module, state)  # gathers ZeRO-3 partitions a layer at a time
    torch.save({"losses": losses, "weights": weights}, out_dir / f"rank{info.rank}.pt")
