"""LoRA and Adapter layout cases (tests/workers/lora_steps.py): shared settings, base checkpoints, results."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from helpers import training
from helpers.checkpoints import save_random_checkpoint
from helpers.launches import Outcome
from helpers.runner import ROOT
from neox_llama.config.loading import load_raw

COMMON = ["vocab_size=256", "seq_length=16", "precision=fp32", "train_batch_size=8", "train_micro_batch_size_per_gpu=2",
          "gradient_accumulation_steps=null", "gradient_clipping=0.5", "seed=11", "optimizer.params.lr=1e-2",
          "optimizer.params.eps=1e-5", "load=unused", "finetune=true", "lora_r=4", "lora_alpha=12", "lora_dropout=0"]
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size", "seq_length",
              "rotary_emb_base", "max_position_embeddings", "no_weight_tying", "make_vocab_size_divisible_by")
UNTIED = ("configs/llama3/tiny.yml", "lora_targets=[query,key,value,output,mlp,head]")
TIED = ("configs/llama3.2/tiny.yml", "lora_targets=[query,value,output,mlp]")


@cache
def base_checkpoint(preset: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The preset's random base checkpoint (written once per session) and its tensors."""
    raw, _ = load_raw([ROOT / preset], apply_presets=False)
    settings = {k: raw[k] for k in MODEL_KEYS if k in raw}
    settings.update(vocab_size=256, precision="fp32")
    folder = training.SESSION_DIR / "peft_bases" / preset.replace("/", "_")
    model = save_random_checkpoint(folder, settings, seed=99)
    return folder, {n: p.detach().clone() for n, p in model.named_parameters()}


def layout_args(preset: str, targets: str, layout: list[str], common: list[str] = COMMON):
    """A lora_steps case's prepare(folder): arguments on the preset's base checkpoint."""
    return lambda folder: [folder, base_checkpoint(preset)[0], ROOT / preset, *common, targets, *layout]


def read_layout(outcome: Outcome, ranks: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The losses (equal on every rank) and the gathered weights of a finished lora_steps case."""
    out = outcome.check().folder
    merged: dict[str, torch.Tensor] = {}
    losses = None
    for rank in range(ranks):
        result = torch.load(out / f"rank{rank}.pt")
        losses = losses or result["losses"]
        assert result["losses"] == pytest.approx(losses, abs=1e-6)
        for key, tensor in result["weights"].items():
            merged.setdefault(key, tensor)
    return losses, merged
