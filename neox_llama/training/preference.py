"""A preference step (DPO, IPO): both responses of each pair scored by the policy and by the reference model in the
same step, the pair losses of :mod:`neox_llama.model.preference_loss`, and TRL's metrics.

The reference is the policy's frozen base with the adapters switched off (:func:`neox_llama.peft.switch.
adapters_disabled`: LoRA, Adapter) or, for full fine-tuning, a frozen copy of the starting weights placed like the
policy (1 rank, data parallel under ZeRO 0-2). Log-probabilities are taken over the true vocabulary (the padded
rows' logits left out), as the Hugging Face export and TRL compute them. The reference is always evaluated without
dropout (:func:`reference_mode`), as TRL evaluates it: it is a fixed target. The policy keeps the run's
``hidden_dropout``/``attention_dropout`` (0 in every LLaMA config; TRL's ``disable_dropout`` also switches the
policy's off). The step's loss is the mean over every pair
of the step (over micro-batches and data-parallel ranks, whatever DeepSpeed averages), plus ``rpo_alpha`` x the mean
negative log-likelihood of every chosen response token of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from neox_llama.config.schema import Config
from neox_llama.model.args import LlamaArgs
from neox_llama.model.preference_loss import METRICS, PreferenceSettings, pair_losses, response_logps
from neox_llama.parallel.pipeline import build_module
from neox_llama.peft.methods import peft_settings
from neox_llama.peft.switch import adapters_disabled
from neox_llama.training import checkpointing as ckpt
from neox_llama.training.engine import TrainingEngine

FROZEN_COPY, BASE_WITHOUT_ADAPTERS = "frozen_copy", "base_without_adapters"


def settings_of(cfg: Config) -> PreferenceSettings | None:
    if not cfg.preference_loss:
        return None
    return PreferenceSettings(cfg.preference_loss, cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.rpo_alpha)


@dataclass
class PreferenceObjective:
    """What a preference step needs beside the engine: the settings, the reference and the true vocabulary."""

    settings: PreferenceSettings
    true_vocab: int
    reference: nn.Module | None = None
    """The frozen copy (full fine-tuning); None: the policy with its adapters switched off."""

    @property
    def reference_kind(self) -> str:
        return FROZEN_COPY if self.reference is not None else BASE_WITHOUT_ADAPTERS

    def describe(self) -> dict:
        """What a checkpoint records of the method (metadata.json: ``preference``)."""
        s = self.settings
        return {"loss": s.loss, "beta": s.beta, "label_smoothing": s.label_smoothing, "rpo_alpha": s.rpo_alpha,
                "reference": self.reference_kind}


def build_reference(cfg: Config, args: LlamaArgs, training_engine: TrainingEngine, weights: Path | None,
                    true_vocab: int) -> PreferenceObjective:
    """The objective; for full fine-tuning, the frozen copy of ``weights`` (the run's starting checkpoint), built and
    filled like the policy, in the engine's dtype and on its device."""
    settings = settings_of(cfg)
    if peft_settings(cfg) is not None:
        return PreferenceObjective(settings, true_vocab)
    state = training_engine.state
    module = build_module(args, state, initialize=False)
    ckpt.load_layer_weights(module, state, weights, args)
    policy = next(training_engine.engine.module.parameters())
    module.to(device=policy.device, dtype=policy.dtype).eval().requires_grad_(False)
    return PreferenceObjective(settings, true_vocab, module)


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
    """This rank's micro-batches of one step (2B rows each: the chosen responses, then the rejected ones)."""

    micro_batches: list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
    pairs: float
    """Pairs of the whole step, over every data-parallel rank."""
    chosen_tokens: float
    """Chosen-response tokens of the whole step (the RPO term's mean)."""


def make_preference_batch(samples: list[dict[str, torch.Tensor]], training_engine: TrainingEngine,
                          device: torch.device) -> PreferenceBatch:
    """``samples`` (this rank's micro-batches from :class:`~neox_llama.data.preference.PreferenceDataset`) with the
    step's pair and chosen-token counts (host tensors reduced over the data-parallel group)."""
    counts = torch.tensor([float(sum(len(m["input_ids"]) // 2 for m in samples)),
                           float(sum(m["loss_mask"].chunk(2)[0].sum() for m in samples))])
    dist.all_reduce(counts, group=training_engine.state.dp_group)
    micro = [((m["input_ids"].to(device), m["position_ids"].to(device)),
              (m["labels"].to(device), m["loss_mask"].to(device))) for m in samples]
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


def run_preference_batch(training_engine: TrainingEngine, batch: PreferenceBatch, objective: PreferenceObjective,
                         *, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (and with ``train`` backward + optimizer step) over the step's micro-batches; the step's mean loss
    and TRL's metrics (means over the step's pairs), equal on every rank, on the model's device."""
    engine, settings = training_engine.engine, objective.settings
    scale = len(batch.micro_batches) * training_engine.state.dp_size  # DeepSpeed averages over these
    totals = None
    for (ids, positions), (labels, mask) in batch.micro_batches:
        labels = torch.where(mask > 0, labels, torch.zeros_like(labels))
        reference_module = engine.module if objective.reference is None else objective.reference
        with reference_mode(reference_module, adapters_off=objective.reference is None):
            ref_logits = reference_module(ids, positions)
            reference, _ = response_logps(_token_logps(ref_logits, labels, objective, training_engine), mask)
        with contextlib.nullcontext() if train else torch.no_grad():
            token_logps = _token_logps(engine(ids, positions), labels, objective, training_engine)
        policy, counts = response_logps(token_logps, mask)
        outcome = pair_losses(policy, reference, counts, settings)
        loss = outcome.losses.sum() / batch.pairs * scale
        if settings.rpo_alpha:
            chosen_mask = mask.chunk(2)[0]
            nll = -(token_logps.chunk(2)[0] * chosen_mask).sum() / max(batch.chosen_tokens, 1.0)
            loss = loss + settings.rpo_alpha * nll * scale
        if train:
            engine.backward(loss)
            engine.step()
        sums = outcome.metric_sums()
        step = torch.stack([loss.detach().float() / scale, *(sums[m].float() / batch.pairs for m in METRICS)])
        totals = step if totals is None else totals + step
    dist.all_reduce(totals, group=training_engine.state.dp_group)
    return totals[0], {name: totals[i + 1] for i, name in enumerate(METRICS)}
