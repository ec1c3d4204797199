"""Learning-rate schedule: linear warmup, then cosine / linear / constant / inverse-sqrt decay to min_lr."""

from __future__ import annotations

import math

from neox_llama.config.schema import Config


def learning_rate(step: int, peak: float, min_lr: float, warmup: int, decay: int, style: str) -> float:
    """Rate for optimizer step ``step`` (0-based): ``peak * (step + 1) / warmup`` during warmup, then the
    decay ``style`` from ``peak`` (end of warmup) to ``min_lr`` (step ``decay``), ``min_lr`` afterwards."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if style == "constant":
        return peak
    if style == "inverse_sqrt":
        return max(min_lr, peak * math.sqrt(max(warmup, 1)) / math.sqrt(max(step, 1)))
    if step >= decay:
        return min_lr
    progress = (step - warmup) / max(1, decay - warmup)
    if style == "cosine":
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "linear":
        return min_lr + (peak - min_lr) * (1.0 - progress)
    raise ValueError(f"unknown lr_decay_style {style!r}")


class LRSchedule:
    """Sets the optimizer's rate every step; DeepSpeed calls ``step()`` after each optimizer step and saves
    ``state_dict()`` in checkpoints."""

    def __init__(self, optimizer, cfg: Config):
        self.optimizer = optimizer
        self.peak, self.min_lr = cfg.optimizer.params.lr, cfg.min_lr
        self.warmup, self.decay = cfg.derived.warmup_iters, cfg.derived.lr_decay_iters
        self.style = cfg.lr_decay_style
        self.num_steps = 0
        self._apply()

    def current(self) -> float:
        return learning_rate(self.num_steps, self.peak, self.min_lr, self.warmup, self.decay, self.style)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.current()

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def get_lr(self) -> list[float]:
        return [self.current()]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()
