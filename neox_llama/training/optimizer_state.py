"""The optimizer's training state, layout-free: every trained tensor's fp32 master and its optimizer state (Adam's
``exp_avg`` and ``exp_avg_sq``, whatever the optimizer keeps per element), so a run resumes at any pp x tp x dp x
ZeRO layout (docs/architecture.md, "Checkpoints").

On disk, beside ``weights/`` (which holds the fp32 masters themselves: :func:`master_values`):
``optimizer/layer_NNN.safetensors`` holds ``{name}.{key}`` for each trained tensor of global layer NNN (whole,
tensor-parallel shards gathered), written by the rank that writes the layer's weights, one gathered layer at a time;
``optimizer/state.json`` holds the optimizer's step, the keys, and the fp16 loss scaler.

The engine's state is read and written through DeepSpeed's own accessors where DeepSpeed keeps a mapping from a
parameter to its fp32 partition (``deepspeed.utils.safe_get_full_fp32_param`` and friends: ZeRO 1-3, offload, the
BF16 optimizer) and through torch's ``optimizer.state`` where the parameter is its own master (fp32 at ZeRO stage
0, pipelines included). A fresh engine has no optimizer state until its first step, and DeepSpeed links its
fragments to that state only then: :meth:`OptimizerView.create_state` takes that step once with zero gradients and
a zero learning rate (nothing moves) and links it, the one call into DeepSpeed's internals (checked against the
pinned 0.19.8 by tests/test_optimizer_state.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from neox_llama.checkpoint.paths import OPTIMIZER, OPTIMIZER_STATE, CheckpointError, optimizer_file
from neox_llama.checkpoint.weights import read_layer_file, write_layer_file
from neox_llama.distributed import agree
from neox_llama.model.factory import shard
from neox_llama.parallel.pipeline import rank_layers
from neox_llama.parallel.topology import ParallelState
from neox_llama.peft.methods import PeftSettings, trained_tensors
from neox_llama.utils.files import atomic_write_text

logger = logging.getLogger("train")

SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""What DeepSpeed's dynamic fp16 loss scaler keeps between steps."""


class OptimizerView:
    """One engine's optimizer seen per model parameter: its fp32 master and its state, as whole (data-parallel
    partitions joined) tensors of this rank's tensor-parallel shard."""

    def __init__(self, engine):
        self.engine = engine
        self.wrapper = engine.optimizer
        self.basic: torch.optim.Optimizer = getattr(self.wrapper, "optimizer", None) or self.wrapper
        self.masters = self._flat_masters()
        self.mapped = self.masters is not None
        """DeepSpeed maps parameters to fp32 partitions (ZeRO 1-3, BF16 optimizer); else each parameter is its own
        master (fp32, no ZeRO)."""

    def _flat_masters(self) -> list[torch.Tensor] | None:
        for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                          "fp32_partitioned_groups_flat"):
            if hasattr(self.wrapper, attribute):
                return list(getattr(self.wrapper, attribute))
        return None

    @classmethod
    def of(cls, engine) -> OptimizerView | None:
        """The view, or None for an optimizer without a per-parameter mapping (DeepSpeed's FP16_Optimizer: fp16 at
        ZeRO stage 0), whose state only DeepSpeed's own files hold."""
        view = cls(engine)
        if view.mapped or isinstance(view.wrapper, torch.optim.Optimizer):
            return view
        return None

    def _optimized(self) -> list[torch.Tensor]:
        """The tensors the torch optimizer steps (fp32 partitions, or the parameters themselves)."""
        if self.mapped:
            return self.masters
        return [p for group in self.basic.param_groups for p in group["params"]]


    # ------------------------------------------------------------------ creating the state of a fresh engine
    def has_state(self) -> bool:
        return all(len(self.basic.state.get(t, {})) > 0 for t in self._optimized())

    @torch.no_grad()
    def create_state(self) -> None:
        """Give a fresh engine its optimizer state: one step of the torch optimizer with zero gradients at learning
        rate 0 (Adam's moments and step come into being as zeros and 1; no weight moves), then DeepSpeed links its
        parameters' fragments to it (as it does after its own first step)."""
        zero3 = hasattr(self.wrapper, "fp32_partitioned_groups_flat")
        if self.mapped:
            self._require("_optimizer_step" if zero3 else "_lazy_init_hp_params_optimizer_state")
        if not self.has_state():
            self._zero_step()
        if self.mapped and not zero3:  # ZeRO 1/2, BF16 optimizer: (re)link, as a pipeline's ZeRO-1 step does not
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()
        if not self.has_state():
            raise CheckpointError(f"{type(self.basic).__name__} kept no state after a step: cannot restore its "
                                  "optimizer state")

    def _require(self, attribute: str) -> None:
        """The DeepSpeed internal this module calls (written against the pinned DeepSpeed 0.19.8) is there."""
        if not hasattr(self.wrapper, attribute):
            import deepspeed

            raise CheckpointError(f"DeepSpeed {deepspeed.__version__}'s {type(self.wrapper).__name__} has no "
                                  f"{attribute}: the layout-free optimizer state is written for DeepSpeed 0.19.8 "
                                  "(requirements.txt); install that version")

    def _zero_step(self) -> None:
        """The optimizer's step on zero gradients at learning rate 0. ZeRO-3 hands its torch optimizer one fp32
        sub-group at a time (its param groups are empty between steps): its own per-sub-group step does that."""
        tensors = self._optimized()
        grads = [t.grad for t in tensors]
        optimizers = [self.basic, *([self.wrapper.backup_optimizer] if getattr(self.wrapper, "backup_optimizer", None)
                                    is not None else [])]
        rates = [[group["lr"] for group in o.param_groups] for o in optimizers]
        for t in tensors:  # a fresh engine's gradient buffers hold nothing yet: zeroed in place, no copy
            t.grad = t.grad.zero_() if t.grad is not None and t.grad.shape == t.shape else torch.zeros_like(t)
        for o in optimizers:
            for group in o.param_groups:
                group["lr"] = 0.0
        try:
            if hasattr(self.wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3
                for sub_group in range(len(tensors)):
                    self.wrapper._optimizer_step(sub_group)
            else:
                self.basic.step()
        finally:
            for t, grad in zip(tensors, grads, strict=True):
                t.grad = grad
            for o, saved in zip(optimizers, rates, strict=True):
                for group, rate in zip(o.param_groups, saved, strict=True):
                    group["lr"] = rate

    # ------------------------------------------------------------------ keys and the step
    def keys(self) -> list[str]:
        """The per-element state the optimizer keeps (``exp_avg``, ``exp_avg_sq`` for Adam)."""
        first = self._optimized()[0]
        return sorted(k for k, v in self.basic.state[first].items()
                      if torch.is_tensor(v) and v.shape == first.shape and k != "step")

    def step(self) -> int:
        state = self.basic.state[self._optimized()[0]]
        value = state.get("step", self.basic.param_groups[0].get("step", 0))
        return int(value.item() if torch.is_tensor(value) else value)

    def set_step(self, step: int) -> None:
        for t in self._optimized():
            state = self.basic.state[t]
            if torch.is_tensor(state.get("step")):
                state["step"].fill_(step)
            elif "step" in state:
                state["step"] = step
        for group in self.basic.param_groups:
            if "step" in group:
                group["step"] = step

    # ------------------------------------------------------------------ per parameter
    def master(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master of ``param`` (collective over the data-parallel group when mapped)."""
        if self.mapped:
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(param).detach()
        return param.detach()

    def state(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        """``param``'s ``key`` state (collective over the data-parallel group when mapped)."""
        if self.mapped:
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(param, key).detach()
        return self.basic.state[param][key].detach()

    def set_master(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        if self.mapped:
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(param, value.to(torch.float32))
        else:
            param.data.copy_(value)

    def set_state(self, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self.mapped:
            from deepspeed.utils import safe_set_full_optimizer_state

            safe_set_full_optimizer_state(param, value.to(torch.float32), key)
        else:
            self.basic.state[param][key].copy_(value)

    # ------------------------------------------------------------------ the fp16 loss scaler
    def scaler(self) -> dict | None:
        scaler = getattr(self.wrapper, "loss_scaler", None)
        if scaler is None or not hasattr(scaler, "cur_scale"):
            return None
        return {name: _plain(getattr(scaler, name)) for name in SCALER_FIELDS if hasattr(scaler, name)}

    def set_scaler(self, values: dict | None) -> None:
        scaler = getattr(self.wrapper, "loss_scaler", None)
        if values and scaler is not None:
            for name, value in values.items():
                setattr(scaler, name, value)


def _plain(value):
    return value.item() if torch.is_tensor(value) else value


def trained(layer: torch.nn.Module, peft: PeftSettings | None) -> dict[str, torch.nn.Parameter]:
    """The tensors of ``layer`` the optimizer holds state for (a LoRA / Adapter run's own; else every unfrozen)."""
    params = trained_tensors(layer, peft) if peft is not None else dict(layer.named_parameters())
    return {name: p for name, p in params.items() if p.requires_grad}


def gather_shards(tensor: torch.Tensor, param: torch.nn.Parameter, state: ParallelState) -> torch.Tensor:
    """``tensor`` (shaped like ``param``'s tensor-parallel shard) joined over the tensor-parallel group, on the CPU."""
    dim = getattr(param, "partition_dim", None)
    if dim is None or state.tp_size == 1:
        return tensor.cpu().clone()
    parts = [torch.empty_like(tensor) for _ in range(state.tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=dim).cpu()


def master_values(view: OptimizerView | None, precision: str) -> Callable[[torch.nn.Parameter], torch.Tensor] | None:
    """What ``weights/`` stores for a trained parameter: its fp32 master where the engine keeps one apart from the
    (bf16 / fp16) parameter; None where the parameter is its own master (fp32)."""
    if view is None or precision == "fp32" or not view.mapped:
        return None
    return view.master


def save_optimizer_state(engine, state: ParallelState, folder: Path, peft: PeftSettings | None) -> bool:
    """Write ``optimizer/`` for this rank's layers (every rank calls it); False where the optimizer has no
    per-parameter view (its state then lives only in DeepSpeed's own files)."""
    view = OptimizerView.of(engine)
    if view is None:
        return False
    view.create_state()  # a checkpoint before the first step: zeros
    keys = view.keys()
    failure: CheckpointError | None = None
    for index, layer in rank_layers(engine.module, state).items():
        if index == 0 and state.pp_rank != 0:
            continue  # the tied embedding's copy on the last stage: the first stage writes layer 0
        params = trained(layer, peft)
        if not params:
            continue
        chosen = state.dp_rank == index % state.dp_size
        if not chosen and not view.mapped:
            continue  # another replica writes it; nothing to join with
        tensors = {}
        for name, param in params.items():
            for key in keys:
                value = view.state(param, key)  # mapped: every data-parallel rank takes part
                if chosen:
                    tensors[f"{name}.{key}"] = gather_shards(value, param, state)
        if chosen and state.tp_rank == 0 and failure is None:
            path = optimizer_file(folder, index)
            try:
                write_layer_file(path, tensors)
            except OSError as err:
                failure = CheckpointError(f"{path}: cannot write ({err})")

    def describe() -> None:
        if failure is not None:
            raise failure
        if dist.get_rank() == 0:
            record = {"step": view.step(), "keys": keys, "optimizer": type(view.basic).__name__,
                      "loss_scaler": view.scaler()}
            atomic_write_text(folder / OPTIMIZER / OPTIMIZER_STATE, json.dumps(record, indent=2) + "\n")

    agree(describe)
    return True


def read_optimizer_record(folder: Path) -> dict:
    path = folder / OPTIMIZER / OPTIMIZER_STATE
    try:
        record = json.loads(path.read_text())
        int(record["step"])
        list(record["keys"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable optimizer record ({err}); the checkpoint is damaged, resume from "
                              "an earlier global_stepN or fine-tune from its weights") from None
    return record


def load_optimizer_state(engine, state: ParallelState, folder: Path, peft: PeftSettings | None,
                         masters_from: Callable[[int], Path] | None) -> None:
    """Restore ``optimizer/`` into a fresh engine at any layout: create its state, set each trained tensor's state
    (this rank's shard of the whole tensor) and the step; ``masters_from`` (a layer index -> the weights or adapter
    file holding its fp32 masters): set the engine's fp32 masters too (bf16 / fp16 runs, whose parameters were
    rounded from them). Every file is checked (damage, non-finite values) before anything is set; the outcome is
    shared, so a bad file stops every rank with its name."""
    view = OptimizerView.of(engine)
    if view is None:
        raise CheckpointError(f"{folder}: this engine's optimizer ({type(engine.optimizer).__name__}) has no "
                              "per-parameter state to restore into")
    record = agree(lambda: read_optimizer_record(folder))
    view.create_state()
    keys = view.keys()
    if sorted(record["keys"]) != keys:
        raise CheckpointError(f"{folder / OPTIMIZER / OPTIMIZER_STATE}: the optimizer state holds "
                              f"{', '.join(record['keys'])}; this run's {type(view.basic).__name__} keeps "
                              f"{', '.join(keys)}")
    layers = {i: layer for i, layer in rank_layers(engine.module, state).items() if trained(layer, peft)}

    def read(index: int) -> tuple[dict, dict]:
        moments = read_layer_file(optimizer_file(folder, index), "optimizer state")
        masters = read_layer_file(masters_from(index)) if masters_from is not None else {}
        for name in trained(layers[index], peft):
            missing = [f"{name}.{key}" for key in keys if f"{name}.{key}" not in moments]
            if missing:
                raise CheckpointError(f"{optimizer_file(folder, index)}: no {', '.join(missing)}")
        return moments, masters

    failure: CheckpointError | None = None
    for index, layer in layers.items():  # one layer in memory at a time; setting needs no collective
        try:
            moments, masters = read(index)
        except CheckpointError as err:
            failure = err
            break
        for name, param in trained(layer, peft).items():
            device = param.device if not hasattr(param, "ds_id") else torch.device("cpu")
            for key in keys:
                view.set_state(param, key, shard(moments[f"{name}.{key}"], param).to(device))
            if name in masters:
                view.set_master(param, shard(masters[name], param).to(device))

    def report() -> None:  # shared, so every rank stops with the bad file's name before any step
        if failure is not None:
            raise failure

    agree(report)
    view.set_step(int(record["step"]))
    view.set_scaler(record.get("loss_scaler"))
