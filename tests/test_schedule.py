"""Learning-rate schedules against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from neox_llama.config import load_config
from neox_llama.training.schedule import LRSchedule, learning_rate

PEAK, MIN, WARM, DECAY = 1e-3, 1e-4, 10, 110


@pytest.mark.parametrize(("step", "expected"), [
    (0, PEAK / 10), (4, PEAK / 2), (9, PEAK),
    (10, PEAK), (60, MIN + (PEAK - MIN) * 0.5), (35, MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi * 0.25))),
    (110, MIN), (500, MIN),
])
def test_cosine(step, expected):
    assert learning_rate(step, PEAK, MIN, WARM, DECAY, "cosine") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("step", "expected"), [(10, PEAK), (60, (PEAK + MIN) / 2), (85, MIN + (PEAK - MIN) * 0.25),
                                                (110, MIN), (200, MIN)])
def test_linear(step, expected):
    assert learning_rate(step, PEAK, MIN, WARM, DECAY, "linear") == pytest.approx(expected, rel=1e-12)


def test_constant_and_inverse_sqrt():
    assert learning_rate(5, PEAK, MIN, WARM, DECAY, "constant") == pytest.approx(PEAK * 6 / 10)
    assert learning_rate(1000, PEAK, MIN, WARM, DECAY, "constant") == PEAK
    assert learning_rate(40, PEAK, MIN, WARM, DECAY, "inverse_sqrt") == pytest.approx(PEAK * math.sqrt(10 / 40))
    assert learning_rate(10**7, PEAK, MIN, WARM, DECAY, "inverse_sqrt") == MIN


def test_schedule_object_drives_the_optimizer_and_resumes(write_yaml):
    cfg = load_config([write_yaml("a.yml", "num_layers: 1\nhidden_size: 8\nnum_attention_heads: 1\n"
                                  "intermediate_size: 8\nseq_length: 4\nvocab_size: 8\n")],
                      ["optimizer.params.lr=1e-3", "min_lr=1e-4", "warmup=0.1", "train_iters=110", "lr_decay_style=linear"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    sched = LRSchedule(opt, cfg)
    rates = []
    for _ in range(30):
        rates.append(opt.param_groups[0]["lr"])
        sched.step()
    assert rates[0] == pytest.approx(1e-3 / 11) and rates[10] == pytest.approx(1e-3)  # warmup = 0.1 x 110 = 11 steps
    again = LRSchedule(opt, cfg)
    again.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(learning_rate(30, 1e-3, 1e-4, 11, 110, "linear"))
