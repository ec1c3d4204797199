"""A case run on every rank by tests/workers/cases.py for tests/test_optimizer_state.py (one launch per world size).

Builds the tiny model's engine at the layout given by the overrides, takes one real optimizer step (the engine's
own state exists), then sets every trained tensor's fp32 master and optimizer state to known values through
:class:`~neox_llama.training.optimizer_state.OptimizerView` and reads them back through it; and, independently of
the view, sums the squares of what the torch optimizer itself holds (its state tensors, over every rank), which
must equal the sum of the values set: a setter that silently did nothing, or wrote into a copy, fails one of them.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from workers.parallel_step import fixed_batch

from neox_llama.config import load_config
from neox_llama.distributed import init_distributed
from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import full_shape, shard
from neox_llama.model.loss import CausalLMLoss
from neox_llama.parallel.pipeline import rank_layers
from neox_llama.parallel.topology import ParallelState
from neox_llama.training.engine import setup_engine
from neox_llama.training.optimizer_state import OptimizerView, trained
from neox_llama.training.step import make_global_batch, run_global_batch


def known(index: int, name: str, what: str, shape) -> torch.Tensor:
    """The same values on every rank for (layer, tensor, what): positive, so squares never cancel."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{index}.{name}.{what}".encode()))
    return torch.rand(shape, generator=gen) + 0.5


def run(argv: list[str]) -> None:
    out_dir, config_file, overrides = Path(argv[0]), argv[1], argv[2:]
    cfg = load_config([config_file], overrides, world_size=int(os.environ["WORLD_SIZE"]))
    info = init_distributed("cpu")
    state = ParallelState(cfg.pipe_parallel_size, cfg.model_parallel_size)
    args = LlamaArgs.from_config(cfg)
    training_engine = setup_engine(cfg, args, state)
    engine = training_engine.engine
    d = cfg.derived
    ids, mask = fixed_batch(args.vocab_size, d.train_batch_size, cfg.seq_length)
    micro = d.train_micro_batch_size_per_gpu
    mine = [(ids[s:s + micro], mask[s:s + micro]) for s in range(0, len(ids), micro)][state.dp_rank::d.data_parallel_size]
    samples = [{"input_ids": x[:, :-1], "labels": x[:, 1:], "loss_mask": m,
                "position_ids": torch.arange(cfg.seq_length).expand(len(x), -1)} for x, m in mine]
    engine.train()
    run_global_batch(training_engine, make_global_batch(samples, training_engine, info.device),
                     CausalLMLoss(training_engine.factory), train=True)

    view = OptimizerView.of(engine)
    view.create_state()  # the state exists after a step; DeepSpeed's fragments are linked to it here
    keys = view.keys()
    expected = torch.zeros(len(keys), dtype=torch.float64)
    wrong: list[str] = []
    for index, layer in rank_layers(engine.module, state).items():
        for name, param in trained(layer, None).items():
            shape = full_shape(param)
            values = {key: known(index, name, key, shape) for key in keys}
            master = known(index, name, "master", shape)
            for key in keys:
                view.set_state(param, key, shard(values[key], param))
            view.set_master(param, shard(master, param))
            for key in keys:  # read back through the view (collective when mapped)
                if not torch.equal(view.state(param, key).cpu(), shard(values[key], param)):
                    wrong.append(f"{index}.{name}.{key}")
            if not torch.equal(view.master(param).cpu().float(), shard(master, param)):
                wrong.append(f"{index}.{name}.master")
            if state.dp_rank == 0:  # each tensor-parallel shard of each layer a stage holds, once
                for k, key in enumerate(keys):
                    expected[k] += shard(values[key], param).double().pow(2).sum()
    view.set_step(7)
    held = torch.zeros(len(keys), dtype=torch.float64)  # what the torch optimizer itself holds
    for tensor in view._optimized():
        for k, key in enumerate(keys):
            held[k] += view.basic.state[tensor][key].double().pow(2).sum()
    dist.all_reduce(expected)
    dist.all_reduce(held)
    result = {"optimizer": type(engine.optimizer).__name__, "basic": type(view.basic).__name__, "mapped": view.mapped,
              "keys": keys, "wrong": wrong, "expected": expected.tolist(), "held": held.tolist(), "step": view.step()}
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(result))
