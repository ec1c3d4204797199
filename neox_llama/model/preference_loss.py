"""Preference losses over pairs of responses: DPO (the sigmoid loss, with conservative DPO's label smoothing), IPO,
and RPO's SFT term, from the responses' log-probabilities under the policy and the reference model.

With ``delta = (policy(chosen) - ref(chosen)) - (policy(rejected) - ref(rejected))`` (sums of log-probabilities over
each response's tokens):

- ``dpo``: ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)`` (Rafailov et al.; ``eps``, the
  ``dpo_label_smoothing``, is conservative DPO (Mitchell, 2023); eps 0 is TRL's ``sigmoid`` loss);
- ``ipo``: ``(delta' - 1 / (2 beta))^2`` where ``delta'`` uses each response's log-probability *averaged* over its
  tokens, as TRL computes IPO (Azar et al. write sums; TRL's authors confirmed the per-token form with them);
- ``rpo_alpha`` adds ``alpha x`` the mean negative log-likelihood of the chosen responses' tokens (TRL's ``sft``
  term, named RPO by Pang et al.).

A reward model (``rm``) scores each sequence with the scalar head at its last token and is trained with the
Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)`` (TRL's RewardTrainer).

KTO (Ethayarajh et al.) scores single completions marked desirable or not, against a reference point ``z``: the
policy/reference KL estimated from mismatched prompt/completion rows of the micro-batch (``max(0, mean(policy(y'|x)
- ref(y'|x)))``, detached, as TRL estimates it): desirable ``w_d (1 - sigmoid(beta (ratio - z)))``, undesirable
``w_u (1 - sigmoid(beta (z - ratio)))``, ``ratio = policy(y|x) - ref(y|x)`` summed over the completion's tokens.

The rewards TRL logs are ``beta x (policy - ref)`` of each response; ``rewards/accuracies`` is the share of pairs
whose chosen reward is the larger, ``rewards/margins`` their mean difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("dpo", "ipo", "kto", "rm")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
"""TRL's names, logged for training and validation."""
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
"""TRL's KTOTrainer names (chosen: desirable completions, rejected: undesirable ones)."""
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
"""A reward model's: its mean scores, the share of pairs scored the right way round (TRL's ``accuracy``) and the
mean score difference (TRL's ``margin``)."""


@dataclass(frozen=True)
class PreferenceSettings:
    """How a preference run weighs its pairs (config keys ``preference_loss``, ``dpo_beta``, ...)."""

    loss: str
    """dpo, ipo or kto."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    """KTO: the weight of a desirable completion's loss."""
    undesirable_weight: float = 1.0
    """KTO: the weight of an undesirable completion's loss."""
    margin_key: str | None = None
    """rm: the record field holding each pair's margin."""


def response_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the log-probabilities of the tokens ``mask`` selects (a response), and their count."""
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(dim=-1), mask.sum(dim=-1)


@dataclass
class PairOutcome:
    """Per pair: the loss and what TRL logs about it."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """Each metric summed over this outcome's pairs (divide by the pairs of the whole step for the means)."""
        c, r = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        return {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/accuracies": (c > r).float().sum(),
                "rewards/margins": (c - r).sum(), "logps/chosen": self.chosen_logps.detach().sum(),
                "logps/rejected": self.rejected_logps.detach().sum()}


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor,
                settings: PreferenceSettings) -> PairOutcome:
    """The loss of each of B pairs from 2B rows (the B chosen responses first, then the B rejected ones, as TRL
    orders them): ``policy`` and ``reference`` hold each row's summed log-probabilities, ``counts`` its tokens."""
    chosen, rejected = policy.float().chunk(2)
    ref_chosen, ref_rejected = reference.float().chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    beta = settings.beta
    if settings.loss == "dpo":
        delta = chosen_ratio - rejected_ratio
        eps = settings.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif settings.loss == "ipo":
        chosen_tokens, rejected_tokens = counts.float().clamp(min=1.0).chunk(2)
        delta = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference_loss {settings.loss!r}; valid: {', '.join(PREFERENCE_LOSSES)}")
    return PairOutcome(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), chosen.detach(),
                       rejected.detach())


@dataclass
class FeedbackOutcome:
    """Per KTO completion: the weighted loss and what TRL logs about it (its metrics split by label)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    logps: torch.Tensor
    desirable: torch.Tensor

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """Sums by label (divide by :meth:`counts` of the whole step), and the completions of each label."""
        good = self.desirable.float()
        bad = 1.0 - good
        return {"rewards/chosen": (self.rewards * good).sum(), "rewards/rejected": (self.rewards * bad).sum(),
                "logps/chosen": (self.logps * good).sum(), "logps/rejected": (self.logps * bad).sum(),
                "count/chosen": good.sum(), "count/rejected": bad.sum()}


def kl_estimate(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point from the mismatched rows' summed log-probabilities: their mean log-ratio (not yet
    clamped: a data-parallel run averages it over ranks first, as TRL gathers it, then clamps at 0)."""
    return (policy_mismatched.float() - reference_mismatched.float()).mean().detach()


def feedback_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
                    settings: PreferenceSettings) -> FeedbackOutcome:
    """The KTO loss of each completion from its summed log-probabilities under the policy and the reference, its
    label (True: desirable) and the (clamped) reference point ``kl``."""
    ratio = policy.float() - reference.float()
    beta, good = settings.beta, desirable.bool()
    kl = kl.clamp(min=0).detach()
    losses = torch.where(good, settings.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return FeedbackOutcome(losses, beta * ratio.detach(), policy.detach().float(), good)


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> PairOutcome:
    """A reward model's Bradley-Terry loss per pair, ``-log sigmoid(r_chosen - r_rejected - margin)`` (TRL's
    RewardTrainer), from the scores of the chosen and rejected sequences (their last tokens')."""
    chosen, rejected = chosen.float(), rejected.float()
    delta = chosen - rejected - (margin.float() if margin is not None else 0.0)
    return PairOutcome(-F.logsigmoid(delta), chosen.detach(), rejected.detach(), chosen.detach(), rejected.detach())


def last_token_scores(scores: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each row's score at its last real token: the input position after the last one ``loss_mask`` marks (the mask
    marks predicted labels; the sequence's last token is the input one position later)."""
    positions = torch.arange(loss_mask.shape[-1], device=loss_mask.device)
    last = (positions * (loss_mask > 0)).argmax(dim=-1) + 1
    return scores.gather(-1, last[:, None])[:, 0]
