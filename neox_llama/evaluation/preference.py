"""A checkpoint's preference metrics on pairs (``tools/evaluate.py --preference-data``): the loss and TRL's metrics
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``) of its responses against a reference model, as a preference run computes them in training; a
reward model's pairwise accuracy, mean scores and margin, and Bradley-Terry loss."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from neox_llama.data.instruction import resolve_style
from neox_llama.data.preference import PairExample, load_pairs, tokenize_pairs
from neox_llama.generation.language_model import LanguageModel
from neox_llama.model.preference_loss import (
    KTO_METRICS,
    METRICS,
    REWARD_METRICS,
    PreferenceSettings,
    feedback_losses,
    kl_estimate,
    pair_losses,
    reward_losses,
)


@dataclass
class PreferenceResult:
    """What ``--preference-data`` reports (and writes as JSON, TRL's names as keys)."""

    values: dict[str, float]

    def summary(self) -> str:
        return " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.values.items())

    def to_json(self) -> str:
        return json.dumps(self.values, indent=2)


def _sums(lm: LanguageModel, examples: list[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response's summed log-probability and token count, the chosen rows first (2B)."""
    rows = [(e.prompt.tolist(), getattr(e, side).tolist()) for side in ("chosen", "rejected") for e in examples]
    scored = lm.token_logprobs([p + r for p, r in rows])  # token k + 1 given those before it
    sums = torch.stack([logps[len(p) - 1:].double().sum() for (p, _), logps in zip(rows, scored, strict=True)])
    return sums, torch.tensor([float(len(r)) for _, r in rows])


def evaluate_pairs(policy: LanguageModel, reference: LanguageModel, path: str | Path, settings: PreferenceSettings,
                   style: str | None = None, seq_length: int | None = None, batch_size: int = 8) -> PreferenceResult:
    """The mean loss and TRL's metrics over the pairs of ``path`` (rendered in ``style``, default: the checkpoint's)."""
    tokenizer = policy.tokenizer
    pairs, chat = load_pairs(path)
    style = resolve_style(style, chat, tokenizer)
    examples = tokenize_pairs(pairs, tokenizer, style, seq_length or policy.run.cfg.seq_length, str(path))
    totals = dict.fromkeys(("loss", *METRICS), 0.0)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        mine, counts = _sums(policy, chunk)
        theirs, _ = _sums(reference, chunk)
        outcome = pair_losses(mine, theirs, counts, settings)
        totals["loss"] += float(outcome.losses.double().sum())
        for name, value in outcome.metric_sums().items():
            totals[name] += float(value)
    values = {name: value / len(examples) for name, value in totals.items()}
    return PreferenceResult({**values, "pairs": len(examples), "prompt_style": style, "loss_type": settings.loss,
                             "beta": settings.beta})


@torch.no_grad()
def _scores(lm: LanguageModel, rows: list[list[int]]) -> torch.Tensor:
    """A reward model's score of each sequence: its head's output at the sequence's last token."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    scores = lm.model(ids.to(lm.device))[..., 0].float().cpu()
    return scores[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]


def evaluate_reward_pairs(lm: LanguageModel, path: str | Path, style: str | None = None,
                          seq_length: int | None = None, batch_size: int = 8,
                          margin_key: str | None = None) -> PreferenceResult:
    """A reward model on the pairs of ``path``: the share scored the right way round (``rewards/accuracies``), the
    mean scores and margin, and the Bradley-Terry loss (with ``margin_key``'s margins, as in training)."""
    pairs, chat = load_pairs(path, margin_key=margin_key)
    style = resolve_style(style, chat, lm.tokenizer)
    examples = tokenize_pairs(pairs, lm.tokenizer, style, (seq_length or lm.run.cfg.seq_length) - 1, str(path))
    totals = dict.fromkeys(("loss", *REWARD_METRICS), 0.0)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        chosen = _scores(lm, [e.prompt.tolist() + e.chosen.tolist() for e in chunk])
        rejected = _scores(lm, [e.prompt.tolist() + e.rejected.tolist() for e in chunk])
        margin = torch.tensor([float(e.margin[0]) for e in chunk]) if margin_key else None
        outcome = reward_losses(chosen, rejected, margin)
        totals["loss"] += float(outcome.losses.double().sum())
        for name, value in outcome.metric_sums().items():
            if name in REWARD_METRICS:
                totals[name] += float(value)
    values = {name: value / len(examples) for name, value in totals.items()}
    return PreferenceResult({**values, "pairs": len(examples), "prompt_style": style, "loss_type": "rm"})


def evaluate_feedback(policy: LanguageModel, reference: LanguageModel, path: str | Path, settings: PreferenceSettings,
                      style: str | None = None, seq_length: int | None = None,
                      batch_size: int = 8) -> PreferenceResult:
    """A KTO checkpoint on labelled completions: the loss and TRL's KTO metrics against ``reference``, in batches of
    ``batch_size`` records in file order, each batch's reference point from its own mismatched rows (prompt i with
    completion i - 1), as a micro-batch of training estimates it."""
    from neox_llama.data.feedback import load_feedback, tokenize_feedback

    records, chat = load_feedback(path)
    style = resolve_style(style, chat, policy.tokenizer)
    examples = tokenize_feedback(records, policy.tokenizer, style, seq_length or policy.run.cfg.seq_length, str(path))
    limit = (seq_length or policy.run.cfg.seq_length) + 1
    sums = dict.fromkeys(("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"), 0.0)
    counts = {"chosen": 0.0, "rejected": 0.0, "batches": 0.0}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = [(e.prompt.tolist(), e.completion.tolist()) for e in chunk]
        rows += [(e.prompt.tolist(), chunk[i - 1].completion.tolist()[: max(0, limit - len(e.prompt))])
                 for i, e in enumerate(chunk)]
        mine, theirs = _row_sums(policy, rows), _row_sums(reference, rows)
        half = len(chunk)
        kl = kl_estimate(mine[half:], theirs[half:])
        outcome = feedback_losses(mine[:half], theirs[:half], torch.tensor([e.desirable for e in chunk]), kl, settings)
        metric = outcome.metric_sums()
        sums["loss"] += float(outcome.losses.double().sum())
        for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            sums[name] += float(metric[name])
        sums["kl"] += float(kl.clamp(min=0))
        counts["chosen"] += float(metric["count/chosen"])
        counts["rejected"] += float(metric["count/rejected"])
        counts["batches"] += 1
    values = {"loss": sums["loss"] / len(examples)}
    for label in ("chosen", "rejected"):
        if counts[label]:
            values[f"rewards/{label}"] = sums[f"rewards/{label}"] / counts[label]
            values[f"logps/{label}"] = sums[f"logps/{label}"] / counts[label]
    if counts["chosen"] and counts["rejected"]:
        values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
    values["kl"] = sums["kl"] / counts["batches"]
    ordered = {k: values[k] for k in ("loss", *KTO_METRICS) if k in values}
    return PreferenceResult({**ordered, "completions": len(examples), "prompt_style": style, "loss_type": "kto",
                             "beta": settings.beta})


def _row_sums(lm: LanguageModel, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Each (prompt, completion) row's summed completion log-probability (0 for an empty completion)."""
    sums = []
    scored = lm.token_logprobs([p + c for p, c in rows if c])
    it = iter(scored)
    for prompt, completion in rows:
        sums.append(next(it)[len(prompt) - 1:].double().sum() if completion else torch.zeros((), dtype=torch.float64))
    return torch.stack(sums)
