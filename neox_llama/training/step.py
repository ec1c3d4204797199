"""One optimizer step, written once: the global batch and its micro-batches, with exact loss normalisation.

Training, evaluation and the parallel-parity test worker all go through :func:`make_global_batch` and
:func:`run_global_batch`. Each token's loss weight is its mask / (valid tokens in the whole step over every
data-parallel rank) x (micro-batches x data-parallel ranks): DeepSpeed's averaging over accumulation steps and
ranks then cancels, and the step's loss is the mean over every valid token of the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from neox_llama.model.loss import CausalLMLoss, token_weights
from neox_llama.training.engine import TrainingEngine

MicroBatch = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""((input_ids, position_ids), (labels, loss weights)) as the model and the loss take them."""


@dataclass
class GlobalBatch:
    """This rank's micro-batches of one optimizer step."""

    micro_batches: list[MicroBatch]
    valid_tokens: float
    """Valid (loss-bearing) tokens of the whole step, over every data-parallel rank."""


def make_global_batch(samples: list[dict[str, torch.Tensor]], training_engine: TrainingEngine,
                      device: torch.device) -> GlobalBatch:
    """Weight ``samples`` (this rank's micro-batches: input_ids, labels, loss_mask, position_ids) for one step.

    Collective device: the valid-token count is a host tensor, reduced over the data-parallel group by gloo
    (the CPU backend of ``cpu:gloo,cuda:nccl`` on GPUs).
    """
    state = training_engine.state
    valid = torch.tensor([float(sum(m["loss_mask"].sum() for m in samples))])
    dist.all_reduce(valid, group=state.dp_group)
    scale = len(samples) * state.dp_size
    # The loader pins its batches on GPUs, so these copies need not wait for the device's queued work.
    pinned = device.type == "cuda"

    def put(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=pinned)

    micro = []
    for m in samples:
        weights = token_weights(m["loss_mask"], valid.item(), scale)
        micro.append(((put(m["input_ids"]), put(m["position_ids"])),
                      (put(m["labels"]), put(weights.pin_memory() if pinned else weights))))
    return GlobalBatch(micro, valid.item())


def next_samples(iterator: Iterator[dict], count: int) -> list[dict] | None:
    """The next ``count`` micro-batches of ``iterator``, or None when it runs out first."""
    try:
        return [next(iterator) for _ in range(count)]
    except StopIteration:
        return None


def run_global_batch(training_engine: TrainingEngine, batch: GlobalBatch, loss_fn: CausalLMLoss, *,
                     train: bool) -> torch.Tensor:
    """Forward (and with ``train`` backward + optimizer step) over the step's micro-batches.

    Returns the step's mean loss per valid token, equal on every rank, as a one-element tensor on the model's
    device: reading it (``float()``) waits for the device, so the training loop does that only at log, evaluation
    and save steps. Collective device: the loss sum lives on the model's device (NCCL on GPUs, gloo on CPU).
    """
    engine = training_engine.engine
    if training_engine.pipelined:
        # DeepSpeed's pipeline averages the micro-batch losses over accumulation steps and data-parallel ranks.
        loss = engine.train_batch(iter(batch.micro_batches)) if train else engine.eval_batch(iter(batch.micro_batches))
        return loss.detach().float().reshape(())
    total = None
    for inputs, targets in batch.micro_batches:
        if train:
            loss = loss_fn(engine(*inputs), targets)
            engine.backward(loss)
            engine.step()
        else:
            with torch.no_grad():
                loss = loss_fn(engine(*inputs), targets)
        loss = loss.detach().float().reshape(1)
        total = loss if total is None else total + loss
    dist.all_reduce(total, group=training_engine.state.dp_group)
    return (total / (len(batch.micro_batches) * training_engine.state.dp_size)).reshape(())
