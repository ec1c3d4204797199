"""A preference step (DPO, IPO, KTO, reward models): both responses of each pair (KTO: each completion and its
mismatched row) scored by the policy and by the reference model in the same step (a reward model: each sequence's
last-token score, no reference), the losses of :mod:`neox_llama.model.preference_loss`, and TRL's metrics.

The reference is the policy's frozen base with the adapters switched off (:func:`neox_llama.peft.switch.
adapters_disabled`: LoRA, Adapter) or, for full fine-tuning, a frozen copy of the starting weights placed like the
policy (whole under ZeRO 0-2, sliced by tensor parallelism, partitioned under ZeRO-3), or the values precomputed
before training (:mod:`neox_llama.training.reference_logps`). Log-probabilities are taken over the true vocabulary (the padded
rows' logits left out), as the Hugging Face export and TRL compute them. The reference is always evaluated without
dropout (:func:`reference_mode`), as TRL evaluates it: it is a fixed target. The policy keeps the run's
``hidden_dropout``/``attention_dropout`` (0 in every LLaMA config; TRL's ``disable_dropout`` also switches the
policy's off). The step's loss is the mean over every pair
of the step (over micro-batches and data-parallel ranks, whatever DeepSpeed averages), plus ``rpo_alpha`` x the mean
negative log-likelihood of every chosen response token of the step.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from neox_llama.config.schema import Config
from neox_llama.errors import TrainingError
from neox_llama.model.args import LlamaArgs
from neox_llama.model.preference_loss import (
    KTO_METRICS,
    METRICS,
    REWARD_METRICS,
    PreferenceSettings,
    feedback_losses,
    kl_estimate,
    last_token_scores,
    pair_losses,
    response_logps,
    reward_losses,
)
from neox_llama.parallel.pipeline import build_module
from neox_llama.peft.methods import peft_settings
from neox_llama.peft.switch import adapters_disabled
from neox_llama.training import checkpointing as ckpt
from neox_llama.training.engine import TrainingEngine

logger = logging.getLogger("train")

FROZEN_COPY, BASE_WITHOUT_ADAPTERS = "frozen_copy", "base_without_adapters"


def settings_of(cfg: Config) -> PreferenceSettings | None:
    if not cfg.preference_loss:
        return None
    return PreferenceSettings(cfg.preference_loss, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.rpo_alpha,
                              cfg.kto_desirable_weight, cfg.kto_undesirable_weight, cfg.rm_margin_key)


@dataclass
class PreferenceObjective:
    """What a preference step needs beside the engine: the settings, the reference and the true vocabulary."""

    settings: PreferenceSettings
    true_vocab: int
    reference: nn.Module | None = None
    """The frozen copy (full fine-tuning); None: the policy with its adapters switched off."""
    reference_engine: object | None = None
    """Under ZeRO-3: the DeepSpeed engine (no optimizer) whose hooks gather the frozen copy's partitions."""
    full: bool = False
    """Full fine-tuning: the reference is the starting weights (a frozen copy), not the base without adapters."""
    precomputed: bool = False
    """``preference_reference: precomputed``: the reference log-probabilities come with the data; no model."""

    @property
    def reference_kind(self) -> str:
        return FROZEN_COPY if self.full else BASE_WITHOUT_ADAPTERS

    def describe(self) -> dict:
        """What a checkpoint records of the method (metadata.json: ``preference``)."""
        s = self.settings
        if s.loss == "rm":
            return {"loss": s.loss, "margin_key": s.margin_key}
        if s.loss == "kto":
            return {"loss": s.loss, "beta": s.beta, "desirable_weight": s.desirable_weight,
                    "undesirable_weight": s.undesirable_weight, "reference": self.reference_kind}
        out = {"loss": s.loss, "beta": s.beta, "label_smoothing": s.label_smoothing, "rpo_alpha": s.rpo_alpha,
               "reference": self.reference_kind}
        if self.precomputed:
            out["reference_logps"] = "precomputed"
        return out


def build_reference(cfg: Config, args: LlamaArgs, training_engine: TrainingEngine, weights: Path | None,
                    true_vocab: int, accelerator: str = "cpu", copy: bool = False) -> PreferenceObjective:
    """The objective; for full fine-tuning, the frozen copy of ``weights`` (the run's starting checkpoint), placed
    like the policy: whole on 1 rank and under ZeRO 0-2, sliced like it under tensor parallelism (the same layer
    factory), partitioned like it under ZeRO-3 (built under ``deepspeed.zero.Init``, filled one gathered layer at a
    time, run by a DeepSpeed engine without an optimizer that gathers each layer for its forward, as TRL places
    its reference under ZeRO-3); in the engine's dtype and on its device. With ``preference_reference:
    precomputed`` no copy is built unless ``copy`` (to precompute with, then released)."""
    settings = settings_of(cfg)
    if settings.loss == "rm":  # a reward model has no reference
        return PreferenceObjective(settings, true_vocab)
    if peft_settings(cfg) is not None:
        return PreferenceObjective(settings, true_vocab, precomputed=cfg.preference_reference == "precomputed")
    if cfg.preference_reference == "precomputed" and not copy:  # computed before training (training/reference_logps.py)
        return PreferenceObjective(settings, true_vocab, full=True, precomputed=True)
    state = training_engine.state
    placement = ("partitioned over the data-parallel ranks (ZeRO-3)" if training_engine.zero_stage == 3 else
                 "whole on each data-parallel rank") + (f", sliced by tensor parallel {state.tp_size}"
                                                        if state.tp_size > 1 else "")
    logger.info("preference reference: a frozen copy of %s, %s", weights, placement)
    if training_engine.zero_stage == 3:
        engine = _partitioned_copy(cfg, args, state, weights, accelerator)
        return PreferenceObjective(settings, true_vocab, engine.module, engine, full=True)
    module = build_module(args, state, initialize=False)
    ckpt.load_layer_weights(module, state, weights, args)
    policy = next(training_engine.engine.module.parameters())
    module.to(device=policy.device, dtype=policy.dtype).eval().requires_grad_(False)
    return PreferenceObjective(settings, true_vocab, module, full=True)


def _partitioned_copy(cfg: Config, args: LlamaArgs, state, weights: Path | None, accelerator: str):
    """The frozen copy under ZeRO-3, partitioned over the data-parallel group from construction, in a DeepSpeed
    engine without an optimizer that gathers it layer by layer for each forward."""
    import deepspeed

    from neox_llama.config.deepspeed_json import deepspeed_config

    config = deepspeed_config(cfg, accelerator, zero_stage=3)
    with torch.device("cpu"):
        torch.empty(0)  # see training.engine.build_partitioned: torch's constructor cache, filled outside zero.Init
    with deepspeed.zero.Init(config_dict_or_path=config, mpu=state, data_parallel_group=state.dp_group):
        module = build_module(args, state, initialize=False)
    ckpt.load_layer_weights(module, state, weights, args)
    module.requires_grad_(False)
    inference = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints memory reports on rank 0
        engine, *_ = deepspeed.initialize(model=module, config=inference, mpu=state)
    engine.eval()
    return engine


@contextlib.contextmanager
def reference_mode(module: nn.Module, adapters_off: bool) -> Iterator[None]:
    """Inside: ``module`` without gradients and in eval mode (no dropout; each submodule's train/eval flag restored
    after), with ``adapters_off`` its adapters switched off too (the LoRA/Adapter reference)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), adapters_disabled() if adapters_off else contextlib.nullcontext():
            yield
    finally:
        for m, training in flags:
            m.training = training


@dataclass
class PreferenceBatch:
    """This rank's micro-batches of one step (2B rows each: the chosen responses, then the rejected ones; KTO: the
    B completions, then their B mismatched rows, and ``desirable``)."""

    micro_batches: list[dict[str, torch.Tensor]]
    examples: float
    """Pairs (KTO: completions) of the whole step, over every data-parallel rank."""
    chosen_tokens: float
    """Chosen-response tokens of the whole step (the RPO term's mean)."""


@dataclass
class PreferenceTotals:
    """TRL's metrics of one or more steps as sums and the counts they are means over."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, other: PreferenceTotals) -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0.0) + other.counts[name]

    def means(self) -> dict[str, float]:
        """Each metric's mean (KTO's ``rewards/margins``: the difference of the two labels' mean rewards, as TRL
        logs it; a label absent from the steps: its metrics left out)."""
        out = {name: value / self.counts[name] for name, value in self.sums.items() if self.counts[name] > 0}
        if "rewards/margins" not in self.sums and {"rewards/chosen", "rewards/rejected"} <= out.keys():
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        order = [m for m in (*METRICS, *KTO_METRICS, *REWARD_METRICS) if m in out]
        return {name: out[name] for name in dict.fromkeys(order)}


def make_preference_batch(samples: list[dict[str, torch.Tensor]], training_engine: TrainingEngine,
                          device: torch.device) -> PreferenceBatch:
    """``samples`` (this rank's micro-batches from :class:`~neox_llama.data.preference.PreferenceDataset` or
    :class:`~neox_llama.data.feedback.FeedbackDataset`) with the step's example and chosen-token counts (host
    tensors reduced over the data-parallel group)."""
    counts = torch.tensor([float(sum(len(m["input_ids"]) // 2 for m in samples)),
                           float(sum(m["loss_mask"].chunk(2)[0].sum() for m in samples))])
    dist.all_reduce(counts, group=training_engine.state.dp_group)
    micro = [{k: v.to(device) for k, v in m.items()} for m in samples]
    return PreferenceBatch(micro, float(counts[0]), float(counts[1]))


def _token_logps(logits: torch.Tensor, labels: torch.Tensor, objective: PreferenceObjective,
                 training_engine: TrainingEngine) -> torch.Tensor:
    """log p(label) per position over the true vocabulary (a tensor-parallel shard's padded ids masked)."""
    factory = training_engine.factory
    if factory.tp_size == 1:
        logits = logits[..., : objective.true_vocab]
    else:
        start = factory.tp_rank * logits.shape[-1]
        ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
        logits = logits.masked_fill(ids >= objective.true_vocab, float("-inf"))
    return -factory.token_cross_entropy(logits, labels)


def reference_logps(micro: dict[str, torch.Tensor], objective: PreferenceObjective,
                     training_engine: TrainingEngine) -> torch.Tensor:
    """Each row's summed response log-probability under the reference."""
    module = training_engine.engine.module if objective.reference is None else objective.reference
    with reference_mode(module, adapters_off=objective.reference is None):
        logits = module(micro["input_ids"], micro["position_ids"])
        return response_logps(_token_logps(logits, micro["labels"], objective, training_engine), micro["loss_mask"])[0]


def _pair_step(micro: dict[str, torch.Tensor], batch: PreferenceBatch, objective: PreferenceObjective,
               training_engine: TrainingEngine, train: bool) -> tuple[torch.Tensor, PreferenceTotals]:
    """DPO / IPO on one micro-batch of pairs: its share of the step's loss and its metric sums."""
    settings, engine = objective.settings, training_engine.engine
    if "reference_logps" in micro:  # precomputed before training
        reference = micro["reference_logps"]
    elif objective.precomputed:
        raise TrainingError("preference_reference precomputed: a micro-batch came without its reference "
                            "log-probabilities")
    else:
        reference = reference_logps(micro, objective, training_engine)
    with contextlib.nullcontext() if train else torch.no_grad():
        token_logps = _token_logps(engine(micro["input_ids"], micro["position_ids"]), micro["labels"], objective,
                                   training_engine)
    policy, counts = response_logps(token_logps, micro["loss_mask"])
    outcome = pair_losses(policy, reference, counts, settings)
    loss = outcome.losses.sum() / batch.examples
    if settings.rpo_alpha:
        chosen_mask = micro["loss_mask"].chunk(2)[0]
        nll = -(token_logps.chunk(2)[0] * chosen_mask).sum() / max(batch.chosen_tokens, 1.0)
        loss = loss + settings.rpo_alpha * nll
    pairs = float(len(policy) // 2)
    sums = {name: float(value) for name, value in outcome.metric_sums().items()}
    return loss, PreferenceTotals(sums, dict.fromkeys(sums, pairs))


def _feedback_step(micro: dict[str, torch.Tensor], batch: PreferenceBatch, objective: PreferenceObjective,
                   training_engine: TrainingEngine, train: bool) -> tuple[torch.Tensor, PreferenceTotals]:
    """KTO on one micro-batch: the reference point from its mismatched rows (averaged over the data-parallel ranks'
    micro-batches, as TRL gathers it), then each completion's loss; its share of the step's loss and metric sums."""
    engine, half = training_engine.engine, len(micro["input_ids"]) // 2
    reference = reference_logps(micro, objective, training_engine)
    main = {k: v[:half] for k, v in micro.items() if k != "desirable"}
    mismatched = {k: v[half:] for k, v in micro.items() if k != "desirable"}
    with torch.no_grad():
        logits = engine(mismatched["input_ids"], mismatched["position_ids"])
        policy_kl, _ = response_logps(_token_logps(logits, mismatched["labels"], objective, training_engine),
                                      mismatched["loss_mask"])
    kl = kl_estimate(policy_kl, reference[half:])
    dist.all_reduce(kl, group=training_engine.state.dp_group)
    kl = kl / training_engine.state.dp_size
    with contextlib.nullcontext() if train else torch.no_grad():
        logits = engine(main["input_ids"], main["position_ids"])
        policy, _ = response_logps(_token_logps(logits, main["labels"], objective, training_engine),
                                   main["loss_mask"])
    outcome = feedback_losses(policy, reference[:half], micro["desirable"], kl, objective.settings)
    sums = {name: float(value) for name, value in outcome.metric_sums().items()}
    good, bad = sums.pop("count/chosen"), sums.pop("count/rejected")
    counts = {"rewards/chosen": good, "logps/chosen": good, "rewards/rejected": bad, "logps/rejected": bad}
    sums["kl"], counts["kl"] = float(kl.clamp(min=0)), 1.0
    return outcome.losses.sum() / batch.examples, PreferenceTotals(sums, counts)


def _reward_step(micro: dict[str, torch.Tensor], batch: PreferenceBatch, objective: PreferenceObjective,
                 training_engine: TrainingEngine, train: bool) -> tuple[torch.Tensor, PreferenceTotals]:
    """A reward model on one micro-batch of pairs: each sequence's score at its last token, the Bradley-Terry loss;
    its share of the step's loss and its metric sums."""
    with contextlib.nullcontext() if train else torch.no_grad():
        scores = training_engine.engine(micro["input_ids"], micro["position_ids"])[..., 0]
        chosen, rejected = last_token_scores(scores, micro["loss_mask"]).chunk(2)
        outcome = reward_losses(chosen, rejected, micro.get("margin"))
    sums = {name: float(value) for name, value in outcome.metric_sums().items() if name in REWARD_METRICS}
    return outcome.losses.sum() / batch.examples, PreferenceTotals(sums, dict.fromkeys(sums, float(len(chosen))))


def run_preference_batch(training_engine: TrainingEngine, batch: PreferenceBatch, objective: PreferenceObjective,
                         *, train: bool) -> tuple[torch.Tensor, PreferenceTotals]:
    """Forward (and with ``train`` backward + optimizer step) over the step's micro-batches; the step's mean loss
    (equal on every rank, on the model's device) and TRL's metrics over the whole step (every rank's)."""
    engine = training_engine.engine
    scale = len(batch.micro_batches) * training_engine.state.dp_size  # DeepSpeed averages over these
    step = {"kto": _feedback_step, "rm": _reward_step}.get(objective.settings.loss, _pair_step)
    total_loss = torch.zeros((), device=batch.micro_batches[0]["input_ids"].device)
    totals = PreferenceTotals()
    for micro in batch.micro_batches:
        loss, metrics = step(micro, batch, objective, training_engine, train)
        if train:
            engine.backward(loss * scale)
            engine.step()
        total_loss += loss.detach().float()
        totals.add(metrics)
    names = sorted(totals.sums)
    packed = torch.tensor([float(total_loss)] + [totals.sums[n] for n in names] + [totals.counts[n] for n in names],
                          dtype=torch.float64, device=total_loss.device)
    dist.all_reduce(packed, group=training_engine.state.dp_group)
    values = packed.tolist()
    reduced = PreferenceTotals(dict(zip(names, values[1:1 + len(names)], strict=True)),
                               dict(zip(names, values[1 + len(names):], strict=True)))
    return torch.tensor(values[0], device=total_loss.device), reduced
