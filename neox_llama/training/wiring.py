"""Wiring one rank's run from the validated config: what it starts from (the load plan), the engine built and filled
from it, the restored training state, the metrics sinks and the data. Nothing here steps or evaluates."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from neox_llama.checkpoint.adapter import adapter_file
from neox_llama.checkpoint.paths import layer_file
from neox_llama.config.schema import Config
from neox_llama.data.feedback import build_feedback_datasets
from neox_llama.data.instruction import build_instruction_datasets
from neox_llama.data.loader import build_datasets, split_sample_counts
from neox_llama.data.preference import build_preference_datasets
from neox_llama.distributed import RankInfo, agree
from neox_llama.errors import TrainingError
from neox_llama.model.args import LlamaArgs
from neox_llama.model.loss import CausalLMLoss
from neox_llama.parallel.topology import ParallelState
from neox_llama.peft.methods import describe
from neox_llama.tokenizers import Tokenizer
from neox_llama.training import checkpointing as ckpt
from neox_llama.training.engine import TrainingEngine, setup_engine
from neox_llama.training.load_plan import LoadPlan, plan_load
from neox_llama.training.metrics import MetricsWriter
from neox_llama.training.optimizer_state import load_optimizer_state
from neox_llama.training.preference import PreferenceObjective, build_reference
from neox_llama.training.reference_logps import attach_reference_logps

logger = logging.getLogger("train")


@dataclass
class TrainingRun:
    """One rank's run, wired: what the training loop and the evaluation work with."""

    cfg: Config
    info: RankInfo
    accelerator: str
    tokenizer: Tokenizer | None
    plan: LoadPlan
    training_engine: TrainingEngine
    train_state: ckpt.TrainingState
    """The step, the data positions and the best validation loss: restored from a resumed checkpoint, saved in each."""
    finetune_info: ckpt.FinetuneInfo
    metrics: MetricsWriter
    datasets: dict
    """The splits (``train``, and ``valid`` / ``test`` where the config gives them)."""
    loss_fn: CausalLMLoss | PreferenceObjective
    """The token loss, or a preference run's objective (its settings and reference)."""

    @property
    def engine(self):
        """The DeepSpeed engine."""
        return self.training_engine.engine

    @property
    def state(self) -> ParallelState:
        return self.training_engine.state


def build_run(cfg: Config, info: RankInfo, accelerator: str, tokenizer: Tokenizer | None) -> TrainingRun:
    """Plan the load, build and fill the engine, restore the training state, open the metrics and build the data."""
    state = ParallelState(cfg.pipe_parallel_size, cfg.model_parallel_size)
    args = LlamaArgs.from_config(cfg)
    # Every rank looks for itself (nodes need not share a filesystem) and all must find the same checkpoint.
    plan = agree(lambda: plan_load(cfg), same_result="the checkpoint to load (load)")
    for note in plan.notes:
        logger.info("%s", note)
    training_engine = setup_engine(cfg, args, state, accelerator, plan=plan, with_schedule=True)
    finetune_info = ckpt.FinetuneInfo(base=plan.base, peft=plan.peft,
                                      prompt_style=plan.meta.prompt_style if plan.resume is not None else None)
    loss_fn: CausalLMLoss | PreferenceObjective = CausalLMLoss(training_engine.factory)
    if cfg.preference_loss:  # the reference: the starting checkpoint (a resumed run's base), or its adapters off
        start = Path(plan.base.path) if plan.resume is not None and plan.base is not None else plan.weights
        loss_fn = agree(lambda: build_reference(cfg, args, training_engine, start, tokenizer.vocab_size, accelerator))
        finetune_info.preference = loss_fn.describe()
    train_state = start_state(cfg, plan, training_engine, info.rank)
    metrics = agree(lambda: MetricsWriter(cfg, info.rank, resume_step=train_state.step))
    datasets = build_data(cfg, tokenizer, finetune_info, announce=info.rank == 0,
                          start=(train_state.step, train_state.consumed_samples))
    if cfg.preference_loss and cfg.preference_reference == "precomputed":
        _precompute_reference(cfg, plan, training_engine, loss_fn, datasets, info, accelerator, args)
    return TrainingRun(cfg, info, accelerator, tokenizer, plan, training_engine, train_state, finetune_info, metrics,
                       datasets, loss_fn)


def _precompute_reference(cfg: Config, plan: LoadPlan, training_engine: TrainingEngine,
                          objective: PreferenceObjective, datasets: dict, info: RankInfo, accelerator: str,
                          args: LlamaArgs) -> None:
    """The splits' reference log-probabilities, read or computed before the first step: by the base with its
    adapters off (LoRA, Adapter), by the policy itself before it has moved (a fresh full fine-tune), else by a
    temporary frozen copy of the starting weights."""
    start = Path(plan.base.path) if plan.resume is not None and plan.base is not None else plan.weights

    def scorer() -> PreferenceObjective:
        if not objective.full:
            return objective
        if plan.resume is None:
            module = training_engine.engine.module
            return PreferenceObjective(objective.settings, objective.true_vocab, module, full=True)
        return build_reference(cfg, args, training_engine, start, objective.true_vocab, accelerator, copy=True)

    fingerprint = plan.base.fingerprint if plan.base is not None else str(start)
    attach_reference_logps(cfg, datasets, objective, training_engine, fingerprint, info.device, info.rank, scorer)


def start_state(cfg: Config, plan: LoadPlan, training_engine: TrainingEngine, rank: int) -> ckpt.TrainingState:
    """The training state the run starts at: step 0, or the resumed checkpoint's, with DeepSpeed's own state (at the
    same layout) or the LR schedule's position (at another), and the random state (at the same world size)."""
    if plan.resume is None:
        if plan.weights is not None:
            what = "the weights"
            if plan.peft is not None:  # LoRA keeps its short form (LoRA r 8); an Adapter names its settings
                what = (f"LoRA r {cfg.lora_r}" if cfg.lora_r else describe(plan.peft)) + " on the frozen weights"
            logger.info("fine-tuning from %s of %s (fresh optimizer, step 0)", what, plan.weights)
        return ckpt.TrainingState()
    folder, layout, engine = plan.resume, plan.meta.layout, training_engine.engine
    train_state = ckpt.TrainingState.from_metadata(plan.meta)
    here = (cfg.pipe_parallel_size, cfg.model_parallel_size, cfg.derived.data_parallel_size, plan.zero_stage)
    saved = (layout.pipe_parallel_size, layout.model_parallel_size, layout.data_parallel_size, layout.zero_stage)
    if plan.optimizer is not None:
        masters_from = None
        if cfg.precision != "fp32":  # the engine's fp32 masters were made from rounded weights: set them
            masters_from = ((lambda i: adapter_file(plan.adapters, i)) if plan.adapters is not None
                            else (lambda i: layer_file(plan.optimizer, i)))
        load_optimizer_state(engine, training_engine.state, plan.optimizer, plan.peft, masters_from)
        engine.lr_scheduler.load_state_dict({"num_steps": train_state.step})
        engine.global_steps, engine.global_samples = train_state.step, train_state.consumed_samples
        if saved == here:
            logger.info("resumed from %s at step %d (%d samples consumed)", folder, train_state.step,
                        train_state.consumed_samples)
        else:
            logger.info("resumed %s, saved at pp %d x tp %d x dp %d (ZeRO %d), under pp %d x tp %d x dp %d (ZeRO %d): "
                        "fp32 master weights, optimizer state, LR schedule and data position restored (step %d, %d "
                        "samples consumed)", folder, *saved, *here, train_state.step, train_state.consumed_samples)
        _say_batch_change(plan.meta.step, train_state.consumed_samples, cfg.derived.train_batch_size)
    elif plan.same_layout:
        ckpt.restore_engine_state(engine, folder, strict=plan.adapters is None)
        logger.info("resumed from %s at step %d (%d samples consumed)", folder, train_state.step,
                    train_state.consumed_samples)
    else:
        engine.lr_scheduler.load_state_dict({"num_steps": train_state.step})
        logger.warning("resuming %s saved at pp %d x tp %d x dp %d (ZeRO %d) under pp %d x tp %d x dp %d (ZeRO %d): "
                       "weights, step %d, data position and LR schedule restored; optimizer state NOT restored "
                       "(it is sharded by layout), the optimizer starts fresh",
                       folder, layout.pipe_parallel_size, layout.model_parallel_size, layout.data_parallel_size,
                       layout.zero_stage, cfg.pipe_parallel_size, cfg.model_parallel_size,
                       cfg.derived.data_parallel_size, plan.zero_stage, train_state.step)
    if layout.world_size == cfg.derived.world_size:
        ckpt.restore_rng(folder, rank)
    return train_state


def _same_style(finetune_info: ckpt.FinetuneInfo, style: str) -> None:
    """A resumed checkpoint's records were rendered in the style this run renders them in; recorded for its saves."""
    saved = finetune_info.prompt_style
    if saved is not None and saved != style:
        raise TrainingError(f"the checkpoint's records were rendered in prompt style {saved}, this run renders them "
                            f"in {style}; set prompt_style: {saved}")
    finetune_info.prompt_style = style


def _say_batch_change(step: int, consumed: int, batch: int) -> None:
    """One line when the run's global batch differs from the one the checkpoint was trained with."""
    if step and consumed != step * batch:
        logger.info("the checkpoint consumed %d samples in %d steps; this run's global batch is %d samples: it "
                    "continues from sample %d", consumed, step, batch, consumed)


def build_data(cfg: Config, tokenizer: Tokenizer | None, finetune_info: ckpt.FinetuneInfo,
               announce: bool = True, start: tuple[int, int] = (0, 0)) -> dict:
    """The run's splits: instruction data (its prompt style checked against a resumed checkpoint's and recorded in
    ``finetune_info``) or token datasets (an empty split the run reads is said once, where ``announce``: rank 0); a
    run without a training split is an error."""
    if cfg.preference_data_path:
        build = build_feedback_datasets if cfg.preference_loss == "kto" else build_preference_datasets
        data = build(cfg, tokenizer, split_sample_counts(cfg, start))
        _same_style(finetune_info, data.style)
        datasets = data.datasets
    elif cfg.sft_data_path:
        data = build_instruction_datasets(cfg, tokenizer, split_sample_counts(cfg, start))
        _same_style(finetune_info, data.style)
        datasets = data.datasets
    else:
        datasets = build_datasets(cfg, announce, start)
    if "train" not in datasets:
        raise TrainingError("no training data: set data_path (split by `split`), train_data_paths or sft_data_path")
    return datasets
