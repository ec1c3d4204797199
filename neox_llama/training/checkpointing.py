"""The distributed half of checkpoints: every rank saves and restores its part (format: :mod:`neox_llama.checkpoint`).

A save writes the layout-free ``weights/`` (the fp32 masters; whole-layer files shared out over the data-parallel
ranks; tensor-parallel shards gathered, ZeRO-3 partitions gathered one layer at a time) and ``optimizer/`` (each
trained tensor's optimizer state, :mod:`neox_llama.training.optimizer_state`), from which a run resumes exactly at
its own layout and continues at any other; DeepSpeed's own engine files only where the optimizer has no
per-parameter view (fp16 at ZeRO stage 0). Then every rank's random state, then, on rank 0, ``config.yml``, the
tokenizer files and ``metadata.json``, and last ``{save}/latest``. Rank 0's part is shared with the other ranks (:func:`neox_llama.distributed.agree`),
so a failure there stops every rank with its message instead of leaving them in a barrier.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from neox_llama.checkpoint.adapter import adapter_file, fill_adapters
from neox_llama.checkpoint.metadata import BaseRef, Layout, Metadata, write_metadata
from neox_llama.checkpoint.paths import BEST, LATEST, METADATA, CheckpointError, layer_file, tag_for
from neox_llama.checkpoint.weights import (
    check_shapes,
    fill_layer_from_file,
    fill_layers,
    layers_with_weights,
    starts_fresh,
    write_layer_file,
)
from neox_llama.config.loading import dump_raw
from neox_llama.config.schema import Config
from neox_llama.distributed import agree
from neox_llama.model.args import LlamaArgs
from neox_llama.parallel.pipeline import rank_layers
from neox_llama.parallel.topology import ParallelState
from neox_llama.peft.lora import LoraSettings
from neox_llama.peft.methods import PeftSettings, trained_tensors
from neox_llama.training.optimizer_state import OptimizerView, master_values, save_optimizer_state
from neox_llama.utils.files import atomic_write_text

logger = logging.getLogger("train")

DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
"""What DeepSpeed copies beside its engine files: converters of ZeRO's sharded files, which these checkpoints do not
hold (an older save directory's copies are removed at the next save)."""


def _is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: list[torch.nn.Parameter]):
    """A context in which ZeRO-3-partitioned ``params`` hold their full data (a no-op for plain parameters)."""
    partitioned = [p for p in params if _is_zero3_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


@torch.no_grad()
def full_tensor(param: torch.Tensor, state: ParallelState, value: torch.Tensor | None = None) -> torch.Tensor:
    """The un-sharded tensor (tensor-parallel shards gathered) of ``param`` (or of ``value``, shaped like its shard,
    e.g. its fp32 master). Collective device: the tensor's own device."""
    dim = getattr(param, "partition_dim", None)
    tensor = param.detach() if value is None else value
    if dim is None or state.tp_size == 1:
        return tensor.cpu().clone()
    parts = [torch.empty_like(tensor) for _ in range(state.tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=dim).cpu()


def save_layer_weights(module: torch.nn.Module, state: ParallelState, folder: Path,
                       adapters_only: PeftSettings | None = None,
                       master_of: Callable[[torch.nn.Parameter], torch.Tensor] | None = None) -> list[int]:
    """Write this stage's layers as full, layout-free tensors, one whole-layer file each; returns the global indices
    of the files this rank wrote.

    The files are shared out over the stage's data-parallel ranks (layer i by data-parallel rank i mod dp, on its
    first tensor-parallel rank), so no rank writes the whole model and writes run in parallel. Tensor-parallel
    shards are gathered, and ZeRO-3 partitions (on every data-parallel rank, as DeepSpeed gathers) one layer at a
    time: at most one full layer is in memory. ``adapters_only`` (a LoRA / Adapter run's settings): only the
    tensors the method trains, into ``adapter/`` instead of ``weights/``. ``master_of``: a trained parameter's fp32
    master (a bf16 / fp16 run's, joined over the data-parallel ranks, which all take part), written instead of its
    rounded value.
    """
    failure: CheckpointError | None = None
    wrote: list[int] = []
    for index, layer in rank_layers(module, state).items():
        if index == 0 and state.pp_rank != 0:
            continue  # the tied embedding's copy on the last stage: the first stage writes layer 0
        params = trained_tensors(layer, adapters_only) if adapters_only else dict(layer.named_parameters())
        if not params:
            continue
        chosen = state.dp_rank == index % state.dp_size  # this data-parallel replica writes the layer
        writer = chosen and state.tp_rank == 0
        masters = master_of is not None and any(p.requires_grad for p in params.values())
        if not chosen and not masters and not any(_is_zero3_partitioned(p) for p in params.values()):
            continue  # another replica writes it; nothing to gather with
        with gathered(list(params.values())):  # ZeRO-3: one layer at a time, on every data-parallel rank
            tensors = {}
            for name, p in params.items():
                value = master_of(p) if master_of is not None and p.requires_grad else None  # every dp rank
                if chosen:  # its tensor-parallel ranks gather the shards (a collective in their own group)
                    tensors[name] = full_tensor(p, state, value)
        target = adapter_file(folder, index) if adapters_only is not None else layer_file(folder, index)
        if writer and failure is None:
            try:
                write_layer_file(target, tensors)
                wrote.append(int(index))
            except OSError as err:  # e.g. a full disk: finish the gathers the other ranks are in, then share it
                failure = CheckpointError(f"{target}: cannot write ({err})")

    def report() -> None:
        if failure is not None:
            raise failure

    agree(report)
    return wrote


def load_adapter_weights(module: torch.nn.Module, state: ParallelState, folder: Path,
                         settings: PeftSettings) -> None:
    """Fill this rank's adapter tensors from an adapter checkpoint's ``adapter/`` (any layout wrote it); shared
    outcome. Under ZeRO-3, trained base tensors (Adapter v2's norms) are partitions: each layer's are gathered,
    filled (the first data-parallel rank's values are kept) and partitioned again."""
    layers = rank_layers(module, state)
    trained = {i: [p for p in trained_tensors(layer, settings).values() if hasattr(p, "ds_id")]
               for i, layer in layers.items()}
    if not any(trained.values()):
        agree(lambda: fill_adapters(layers, folder, settings))
        return
    import deepspeed

    for index, layer in layers.items():
        failure: CheckpointError | None = None
        with deepspeed.zero.GatheredParameters(trained[index], modifier_rank=0):
            try:
                fill_adapters({index: layer}, folder, settings)
            except CheckpointError as err:  # shared below, so no rank waits in a later collective
                failure = err
        agree(lambda failure=failure: _raise(failure))


def load_layer_weights(module: torch.nn.Module, state: ParallelState, folder: Path, args: LlamaArgs,
                       fresh_score: bool = False) -> None:
    """Fill this rank's layers from ``weights/`` (cut to its tensor-parallel shard), whatever layout wrote them.

    Runs before the engine exists. Every rank reads only its own stage's files; the outcome is shared, so a bad
    file on one stage stops every rank with its name. Under ZeRO-3 (parameters partitioned from construction)
    the files' names and shapes are checked first from their headers, then each layer is gathered in turn, filled
    by the first data-parallel rank from its file and partitioned again: at most one layer is whole at a time.
    """
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        agree(lambda: fill_layers(rank_layers(module, state), folder, expected=layers_with_weights(args),
                                  fresh_score=fresh_score))
        return
    import deepspeed

    agree(lambda: check_shapes(folder, args, fresh_score=fresh_score))
    for index, layer in rank_layers(module, state).items():
        params = list(layer.parameters())
        if not params or (fresh_score and starts_fresh(layer, layer_file(folder, index))):
            continue  # a tied head; a reward model's score head over a language model's checkpoint
        failure: CheckpointError | None = None
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if state.dp_rank == 0:
                path = layer_file(folder, index)
                try:
                    fill_layer_from_file(layer, path)
                except CheckpointError as err:  # shared below, so no rank waits in a later collective
                    failure = err
        agree(lambda failure=failure: _raise(failure))


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainingState:
    """What resuming needs besides the engine: the step, the data positions, and bookkeeping."""

    step: int = 0
    consumed_samples: int = 0
    consumed_valid_samples: int = 0
    best_valid_loss: float | None = None
    evaluations_without_improvement: int = 0

    @classmethod
    def from_metadata(cls, meta: Metadata) -> TrainingState:
        return cls(step=meta.step, consumed_samples=meta.consumed_samples,
                   consumed_valid_samples=meta.consumed_valid_samples, best_valid_loss=meta.best_valid_loss,
                   evaluations_without_improvement=meta.evaluations_without_improvement)


def layout_of(cfg: Config, zero_stage: int) -> Layout:
    """The layout a run at ``cfg``'s parallel sizes writes, its engine running ZeRO ``zero_stage``."""
    return Layout(cfg.pipe_parallel_size, cfg.model_parallel_size, cfg.derived.data_parallel_size, zero_stage,
                  cfg.derived.world_size)


@dataclass
class FinetuneInfo:
    """What a fine-tune's checkpoints say about it besides the step (see checkpoint/metadata.py)."""

    base: BaseRef | None = None
    peft: PeftSettings | None = None
    """LoRA / Adapter settings: the checkpoint then holds only what they train."""
    prompt_style: str | None = None
    preference: dict | None = None
    """A preference run's method (checkpoint/metadata.py: Metadata.preference)."""


def save_checkpoint(engine, module_state: ParallelState, cfg: Config, train: TrainingState,
                    tokenizer_files: list[Path], tag: str | None = None, info: FinetuneInfo | None = None, *,
                    zero_stage: int) -> Path:
    """Save everything needed to resume; returns the folder. Every rank must call this. ``zero_stage``: the stage the
    engine runs (the load plan's), recorded in the checkpoint's layout.

    A LoRA or Adapter run (``info.peft``) saves only what it trains: DeepSpeed's state without the frozen base,
    and the trained tensors in ``adapter/``; its metadata names the base.
    """
    info = info or FinetuneInfo()
    peft = info.peft
    save = Path(cfg.save)
    tag = tag or tag_for(train.step)
    # `best` is replaced in place: it is written beside the old one and swapped in at the end, so a crash
    # during the save keeps the previous best. A global_stepN tag is new (or an incomplete leftover).
    replaces = tag == BEST
    folder = save / (f"{tag}.partial" if replaces else tag)
    rank = dist.get_rank()

    def invalidate() -> None:
        if replaces:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            (folder / METADATA).unlink(missing_ok=True)  # re-saving a tag: incomplete until metadata is rewritten

    agree(invalidate, rank0_only=True)
    view = OptimizerView.of(engine)
    if view is None:  # fp16 at ZeRO stage 0: only DeepSpeed's own files hold its optimizer state
        engine.save_checkpoint(str(save), tag=folder.name, save_latest=False,
                               exclude_frozen_parameters=peft is not None)
    save_layer_weights(engine.module, module_state, folder, adapters_only=peft,
                       master_of=master_values(view, cfg.precision))
    save_optimizer_state(engine, module_state, folder, peft)

    def save_rng() -> None:
        (folder / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), folder / "rng" / f"rank_{rank}.pt")

    agree(save_rng)

    def finish() -> None:
        dump_raw(cfg.raw, folder / "config.yml", header=f"# the merged config of the run that saved {tag}")
        for file in tokenizer_files:
            shutil.copyfile(file, folder / file.name)
        meta = Metadata(tag=tag, step=train.step, consumed_samples=train.consumed_samples,
                        consumed_valid_samples=train.consumed_valid_samples, best_valid_loss=train.best_valid_loss,
                        evaluations_without_improvement=train.evaluations_without_improvement,
                        layout=layout_of(cfg, zero_stage), tokenizer_files=[f.name for f in tokenizer_files],
                        precision=cfg.precision, prompt_style=info.prompt_style, base=info.base,
                        lora=peft.to_dict() if isinstance(peft, LoraSettings) else None,
                        adapter=peft.to_dict() if peft is not None and not isinstance(peft, LoraSettings) else None,
                        preference=info.preference)
        write_metadata(folder, meta)
        if replaces:
            _swap_in(folder, save / tag)
        if tag.startswith("global_step"):
            atomic_write_text(save / LATEST, tag)
            _prune(save, cfg.keep_last_n_checkpoints, keep=tag)
        for script in DEEPSPEED_SCRIPTS:  # they cannot convert these checkpoints: weights/ already is the fp32 state
            (save / script).unlink(missing_ok=True)

    agree(finish, rank0_only=True)
    logger.info("saved checkpoint %s", save / tag)
    return save / tag


def _swap_in(new: Path, final: Path) -> None:
    """Replace the checkpoint ``final`` by the complete one in ``new`` (the old one is removed last)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _prune(save: Path, keep_last: int | None, keep: str) -> None:
    steps = sorted((int(m.group(1)), p) for p in save.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"global_step(\d+)", p.name)))
    complete = [(s, p) for s, p in steps if (p / METADATA).exists()]
    for _, path in steps:  # folders left incomplete by an interrupted save
        if not (path / METADATA).exists() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    if keep_last:
        for _, path in complete[:-keep_last]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)


def check_engine_files(folder: Path) -> None:
    """Every DeepSpeed state file of ``folder`` is a complete archive (a truncated one is named here, not deep in
    torch.load). Reads only each file's end-of-archive directory."""
    for path in sorted(folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"{path}: unreadable engine state ({err}); the checkpoint is damaged, resume "
                                  "from an earlier global_stepN or fine-tune from its weights") from None


def check_resume_files(module: torch.nn.Module, state: ParallelState, folder: Path, args: LlamaArgs) -> None:
    """Before DeepSpeed loads its state: this rank's layers' weight shapes (safetensors headers) and the engine
    files, each failure naming its file; the outcome is shared, so every rank stops with it."""

    def check() -> None:
        check_shapes(folder, args, only=set(rank_layers(module, state)))
        check_engine_files(folder)

    agree(check)


def restore_engine_state(engine, folder: Path, strict: bool = True) -> None:
    """Load DeepSpeed's model, optimizer and schedule state (same layout only); ``strict`` False for a LoRA
    checkpoint, whose engine state leaves out the frozen base."""
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed 0.19 prints "_load_legacy_checkpoint ..." here
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=strict)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no engine state to load")


def restore_rng(folder: Path, rank: int) -> bool:
    path = folder / "rng" / f"rank_{rank}.pt"
    if not path.is_file():
        return False
    try:
        state = torch.load(path, weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: unreadable random state ({err})") from None
    _set_rng_state(state)
    return True
