"""The DeepSpeed engine configuration, derived from the one validated Config (never written by hand)."""

from __future__ import annotations

from typing import Any

from neox_llama.config.schema import Config


def deepspeed_config(cfg: Config, accelerator: str = "cpu", zero_stage: int | None = None) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize``. ``cfg`` must have been resolved.

    On CPU the optimizer is torch's (``torch_adam``), so nothing has to be compiled at start-up, unless ZeRO-Offload
    asks for DeepSpeedCPUAdam. ``zero_stage``: the stage DeepSpeed runs when a resume keeps a checkpoint's own
    (the training load plan's); None: ``derived.engine_zero_stage``.
    """
    d = cfg.derived
    zero = cfg.zero_optimization
    gpu = accelerator == "cuda"
    params = cfg.optimizer.params
    ds: dict[str, Any] = {
        "train_batch_size": d.train_batch_size,
        "train_micro_batch_size_per_gpu": d.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        "gradient_clipping": cfg.gradient_clipping,
        "steps_per_print": 1 << 30,  # neox_llama logs metrics itself
        "wall_clock_breakdown": cfg.wall_clock_breakdown,
        "optimizer": {
            "type": cfg.optimizer.type,
            "params": {
                "lr": params.lr,
                "betas": list(params.betas),
                "eps": params.eps,
                "weight_decay": params.weight_decay,
                "adam_w_mode": cfg.optimizer.type == "AdamW",  # DeepSpeed's "Adam" means AdamW unless told
                **({"torch_adam": True, "fused": params.fused} if _torch_adam(cfg, accelerator) else {}),
            },
        },
        "zero_optimization": {
            # 0 on one fp32 rank (validation.engine_zero_stage)
            "stage": d.engine_zero_stage if zero_stage is None else zero_stage,
            "allgather_partitions": zero.allgather_partitions,
            "allgather_bucket_size": _auto(zero.allgather_bucket_size, 500_000_000, 50_000_000, gpu),
            "reduce_scatter": zero.reduce_scatter,
            "reduce_bucket_size": _auto(zero.reduce_bucket_size, 500_000_000, 50_000_000, gpu),
            "overlap_comm": zero.overlap_comm,
            "contiguous_gradients": zero.contiguous_gradients,
            **({"stage3_param_persistence_threshold": zero.stage3_param_persistence_threshold,
                "stage3_prefetch_bucket_size": _auto(zero.stage3_prefetch_bucket_size, 50_000_000, 50_000_000, gpu),
                "stage3_max_live_parameters": _auto(zero.stage3_max_live_parameters, 1_000_000_000, 1_000_000_000, gpu),
                "stage3_max_reuse_distance": _auto(zero.stage3_max_reuse_distance, 1_000_000_000, 1_000_000_000, gpu)}
               if zero.stage == 3 else {}),
        },
        "zero_allow_untested_optimizer": True,
        "activation_checkpointing": {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        },
    }
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(zero, key)
        if device != "none":
            ds["zero_optimization"][key] = {"device": device, "pin_memory": gpu,
                                            **({"nvme_path": zero.nvme_path} if device == "nvme" else {})}
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # Accumulate micro-batch gradients in fp32: summing them in bf16 loses precision with every step.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif cfg.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": cfg.loss_scale,
            "initial_scale_power": cfg.initial_scale_power,
            "loss_scale_window": cfg.loss_scale_window,
            "hysteresis": cfg.hysteresis,
            "min_loss_scale": cfg.min_loss_scale,
        }
    return ds


def _torch_adam(cfg: Config, accelerator: str) -> bool:
    """torch's AdamW (nothing to compile) unless asked otherwise; ZeRO-Offload needs DeepSpeedCPUAdam."""
    if cfg.zero_optimization.offload_optimizer != "none":
        return False
    chosen = cfg.optimizer.params.torch_adam
    return chosen if chosen is not None else accelerator != "cuda"


def _auto(value: int | None, on_gpu: int, on_cpu: int, gpu: bool) -> int:
    """A ZeRO size the config left to the accelerator (null): GPU memory can hold DeepSpeed's large buffers;
    on CPU they are host memory, so smaller ones (measured by benchmarks/memory.py)."""
    if value is not None:
        return value
    return on_gpu if gpu else on_cpu

