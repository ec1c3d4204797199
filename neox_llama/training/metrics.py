"""Training metrics to the console, ``{log_dir}/metrics.jsonl``, TensorBoard and Weights & Biases (rank 0 only).

metrics.jsonl keys are a contract (README, docs/architecture.md): training records carry ``step, loss, lr, grad_norm,
tokens_per_sec, mfu`` (and ``hfu``: MFU plus activation checkpointing's recomputation); evaluation records ``step, valid_loss, valid_ppl`` (and ``valid_bpb``, bits per byte, with a tokenizer; a preference run: ``valid_loss`` and TRL's metrics prefixed ``valid_``, no perplexity); the end-of-run test evaluation ``step, test_loss, test_ppl`` (``test_bpb``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from neox_llama.config.schema import Config
from neox_llama.utils.peak import known_peak_tflops, measure_matmul_tflops

logger = logging.getLogger("train")


class MetricsWriter:
    """Writes one record per call to every configured sink; a no-op on ranks other than 0."""

    def __init__(self, cfg: Config, rank: int, resume_step: int = 0):
        self.enabled = rank == 0
        self.path = Path(cfg.log_dir) / "metrics.jsonl" if cfg.log_dir else None
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(self.path, resume_step)
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=cfg.tensorboard_dir)
        if cfg.use_wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.wandb_project, group=cfg.wandb_group, config=cfg.raw,
                                    dir=cfg.log_dir or None, resume="allow")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(clean) + "\n")
        step = record["step"]
        numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and v is not None and k != "step"}
        if self.tb:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def has_record(self, step: int, key: str) -> bool:
        """Whether metrics.jsonl already holds a record of ``step`` with ``key`` (False on ranks other than 0)."""
        if not (self.enabled and self.path and self.path.exists()):
            return False
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step") == step and key in record:
                return True
        return False

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    os.replace(tmp, path)


def peak_tflops(cfg: Config, accelerator: str) -> float:
    """The peak TFLOP/s per rank MFU is measured against, where ``peak_tflops`` is not set: a known GPU's dense peak at
    the run's precision, else a measured matmul (on a CPU without native bf16, the faster fp32 one)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
    device = "cuda" if accelerator == "cuda" else "cpu"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        known = known_peak_tflops(name, dtype)
        if known is not None:
            logger.info("peak_tflops not set: %s's dense %s peak, %.0f TFLOP/s, for MFU", name, cfg.precision, known)
            return known
    peak = measure_matmul_tflops(dtype, device=device)
    if device == "cpu" and dtype == torch.bfloat16:
        fp32 = measure_matmul_tflops(torch.float32)
        if peak < 0.5 * fp32:  # emulated bf16 converts to fp32 anyway: the hardware's peak is the fp32 one
            logger.warning("this CPU has no native bf16 (no AVX-512-BF16/AMX): its bf16 matmuls run at %.1f%% of "
                           "fp32 speed; precision: fp32 trains faster here", 100 * peak / fp32)
            logger.info("peak_tflops not set: measured %.3f TFLOP/s per rank (fp32 matmul, faster than this CPU's "
                        "emulated bf16) for MFU", fp32)
            return fp32
    logger.info("peak_tflops not set: measured %.3f TFLOP/s per rank (%s matmul) for MFU", peak, cfg.precision)
    return peak


def format_train(record: dict) -> str:
    """The console line of a training record."""
    parts = [f"step {record['step']:>6}"] + ([f"epoch {record['epoch']}"] if "epoch" in record else [])
    parts += [f"loss {record['loss']:.4f}"]
    parts += [f"{k} {record[k]:.4f}" for k in ("rewards/accuracies", "rewards/margins") if k in record]  # preference
    parts += [f"lr {record['lr']:.3e}",
             f"grad_norm {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else "grad_norm n/a",
             f"{record['tokens_per_sec']:,.0f} tok/s", f"{record['tflops_per_rank']:.2f} TFLOP/s/rank",
             f"MFU {record['mfu']:.1%}"]
    if record.get("hfu") and abs(record["hfu"] - record["mfu"]) > 1e-12:
        parts.append(f"HFU {record['hfu']:.1%}")
    if record.get("loss_scale") is not None:
        parts.append(f"loss_scale {record['loss_scale']:g}")
    parts.append(f"step {record['step_time']:.2f}s (data {record['time_data']:.2f}s)")
    return " | ".join(parts)
