"""Building the DeepSpeed engine from the config and the load plan: this rank's model, filled with the weights the
plan names, made trainable (LoRA, Adapter, freezing), its optimizer groups, and the engine at the plan's ZeRO stage."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from neox_llama.checkpoint.weights import is_reward_checkpoint
from neox_llama.config import Config, deepspeed_config, zero_text
from neox_llama.distributed import agree
from neox_llama.errors import TrainingError
from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import LayerFactory, full_shape, held_numel
from neox_llama.model.init import init_weights
from neox_llama.model.llama import TransformerBlock
from neox_llama.parallel.pipeline import build_module, layer_factory, rank_layers
from neox_llama.parallel.topology import ParallelState
from neox_llama.peft.freeze import apply_freeze
from neox_llama.peft.methods import apply_peft, describe, peft_settings
from neox_llama.training import checkpointing as ckpt
from neox_llama.training.load_plan import LoadPlan

logger = logging.getLogger(__name__)

EMBEDDING_NAMES = ("word_embeddings.weight", "position_embeddings.weight", "head.weight")


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases (and embeddings/head unless asked) do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name.endswith(EMBEDDING_NAMES)
        if len(full_shape(param)) < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class TrainingEngine:
    """The DeepSpeed engine and what the step, the loop and checkpoints need next to it."""

    engine: object
    """deepspeed.DeepSpeedEngine, or PipelineEngine when pipelined."""
    state: ParallelState
    factory: LayerFactory
    args: LlamaArgs
    zero_stage: int
    """The ZeRO stage DeepSpeed runs (the load plan's; checkpoints record it in their layout)."""

    @property
    def pipelined(self) -> bool:
        return self.state.pp_size > 1


def make_trainable(module: nn.Module, cfg: Config, state: ParallelState, args: LlamaArgs) -> tuple[int, int]:
    """LoRA or Adapter (v2) modules on a frozen base (``lora_r`` > 0, ``peft_method``), or the ``freeze`` patterns
    of a full fine-tune; returns (trainable, total) parameters of this rank (shards counted as held)."""
    layers = rank_layers(module, state)
    settings = peft_settings(cfg)
    if settings is not None:
        apply_peft(layers, settings, layer_factory(state), args, cfg.seed)
        if args.num_labels:  # a reward model's score head trains with the adapters (kept in their checkpoints)
            for layer in layers.values():
                if hasattr(layer, "score"):
                    layer.score.requires_grad_(True)
    elif cfg.freeze:
        apply_freeze(layers, cfg.freeze, cfg.num_layers, tied=not cfg.no_weight_tying)
    params = {id(p): p for p in module.parameters()}.values()
    return sum(held_numel(p) for p in params if p.requires_grad), sum(held_numel(p) for p in params)


def compile_blocks(module: nn.Module, enabled: bool) -> int:
    """``torch.compile`` every transformer block of ``module`` in place (``nn.Module.compile``: names, hooks and
    state dicts unchanged); blocks share their code, so one compilation serves them all. Returns how many."""
    if not enabled:
        return 0
    blocks = [m for m in module.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        block.compile()
    return len(blocks)


def build_partitioned(cfg: Config, args: LlamaArgs, state: ParallelState, accelerator: str,
                      checkpoint_every: int) -> nn.Module:
    """The model under ZeRO-3 with every rank holding only its partition from the start.

    Built under ``deepspeed.zero.Init``, each submodule's parameters are partitioned over the data-parallel ranks
    as soon as it is made; then each layer is gathered in turn (at most one full layer in memory), given the
    layout-free initial values on the first data-parallel rank, and partitioned again (DeepSpeed broadcasts them).
    The values equal the full build's: the same draw per (seed, layer, name), cast as the engine would cast it.
    """
    import deepspeed

    # torch caches the set of tensor constructors that `with torch.device(...)` redirects on its first use; made
    # inside zero.Init, that set holds DeepSpeed's patched constructors, and every later `torch.device("meta")`
    # build (checkpoint shape checks) silently allocates full float32 tensors on the CPU. Fill it first.
    with torch.device("cpu"):
        torch.empty(0)
    # Partitioned over the data-parallel group only: zero.Init's default is the whole world, which under tensor
    # parallelism would mix different ranks' shards into one partitioned tensor (mpu= does not change that).
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, accelerator, zero_stage=3), mpu=state,
                             data_parallel_group=state.dp_group):
        module = build_module(args, state, checkpoint_every=checkpoint_every, initialize=False)
    for index, layer in module.named_children():
        params = list(layer.parameters())
        if not params:
            continue  # a tied head
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if state.dp_rank == 0:
                init_weights(layer, int(index), args)
    return module


def keep_grad_norm(engine, one_rank: bool) -> None:
    """At ZeRO 0 in fp32, DeepSpeed clips through its own ``clip_grad_norm_`` and keeps no norm (the metrics'
    grad_norm would be n/a), and only when clipping is on. Make its clipping step keep the norm. On one rank,
    torch's foreach norm does that work instead of DeepSpeed's per-tensor loop (which also rescales every gradient,
    clipped or not), and runs with clipping off too ("clipping" at infinity: measured, nothing scaled); several
    ranks without clipping keep DeepSpeed's behaviour (no norm, no extra reduction)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    if one_rank and not engine.gradient_clipping() > 0:
        engine._config.gradient_clipping = math.inf  # DeepSpeed calls clip_fp32_gradients only when clipping is on

    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        limit = engine.gradient_clipping()
        if one_rank:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if not math.isinf(limit):
                torch.nn.utils.clip_grads_with_norm_(params, limit, norm, foreach=True)
        else:  # tensor-parallel shards and data-parallel ranks: DeepSpeed's reductions
            norm = clip_grad_norm_(parameters=params, max_norm=limit, mpu=engine.mpu)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip


def fill_weights(module: nn.Module, plan: LoadPlan, state: ParallelState, args: LlamaArgs) -> None:
    """Before the engine exists (so that the optimizer's master copies start from them): the weights of
    ``plan.weights``; or, resuming at the same layout (DeepSpeed loads the weights later), one clear error naming
    the file for a damaged checkpoint, before DeepSpeed reads its state."""
    if plan.weights is not None:  # a reward model over a language model starts its score head fresh
        fresh = bool(args.num_labels) and not is_reward_checkpoint(plan.weights)
        ckpt.load_layer_weights(module, state, plan.weights, args, fresh_score=fresh)
    elif plan.resume is not None:
        ckpt.check_resume_files(module, state, plan.resume, args)


def fill_adapters(module: nn.Module, plan: LoadPlan, state: ParallelState) -> None:
    """After the adapters are attached: the tensors of the adapter checkpoint the plan resumes (if any), and at the
    same layout a check of its engine files before DeepSpeed reads them."""
    if plan.adapters is None:
        return
    ckpt.load_adapter_weights(module, state, plan.adapters, plan.peft)
    if plan.same_layout:
        agree(lambda: ckpt.check_engine_files(plan.adapters))


def setup_engine(cfg: Config, args: LlamaArgs, state: ParallelState, accelerator: str = "cpu", *,
                 plan: LoadPlan | None = None, with_schedule: bool = False) -> TrainingEngine:
    """``deepspeed.initialize`` on this rank's model with the engine config derived from ``cfg``.

    ``plan`` (:func:`neox_llama.training.load_plan.plan_load`; None: a fresh model) says which weights fill the
    module before the engine exists (:func:`fill_weights`) and the ZeRO stage the engine runs; then LoRA adapters
    or freezing are applied (:func:`make_trainable`) and a resumed adapter checkpoint's tensors loaded
    (:func:`fill_adapters`); ``with_schedule`` attaches the LR schedule. Only trainable parameters reach the
    optimizer.
    """
    import deepspeed

    from neox_llama.training.schedule import LRSchedule

    plan = plan if plan is not None else LoadPlan(zero_stage=cfg.derived.engine_zero_stage)
    stage = plan.zero_stage
    # Dropout: tensor-parallel ranks share a stream (their activations are replicated); data-parallel ranks and
    # pipeline stages draw different masks. Initialisation does not use this stream (see model/init.py).
    torch.manual_seed(cfg.seed + 100_003 * state.dp_rank + 10_007 * state.pp_rank)
    # full: groups of blocks recomputed; selective: only attention cores (LlamaArgs.recompute_attention)
    every = cfg.checkpoint_num_layers if cfg.checkpoint_activations and cfg.checkpoint_granularity == "full" else 0
    if cfg.zero_optimization.stage == 3:  # (ZeRO-3 has no pipeline: config validation refuses it)
        module = build_partitioned(cfg, args, state, accelerator, every)
    else:
        module = build_module(args, state, checkpoint_every=every, partition_method=cfg.pipe_partition_method)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    logger.info("built the model on this rank: %s parameters held of %s on this stage/slice%s", f"{held:,}",
                f"{sum(held_numel(p) for p in module.parameters()):,}",
                " (ZeRO-3 partitions)" if cfg.zero_optimization.stage == 3 else "")
    fill_weights(module, plan, state, args)
    trainable, total = make_trainable(module, cfg, state, args)
    how = ""
    if peft_settings(cfg) is not None:
        how = f"; {describe(peft_settings(cfg))}"
    elif cfg.freeze:
        how = f"; frozen: {', '.join(cfg.freeze)}"
    logger.info("trainable parameters on this rank: %s of %s (%.3f%%)%s", f"{trainable:,}", f"{total:,}",
                100.0 * trainable / max(total, 1), how)
    def check() -> None:  # shared, so every rank stops instead of waiting in deepspeed.initialize
        if trainable == 0 and cfg.peft_method == "adapter":
            raise TrainingError(f"no parameter is trainable on this rank: peft_method adapter trains only the blocks "
                                f"from adapter_start_layer {cfg.adapter_start_layer} on, and this pipeline stage "
                                "holds none of them; lower adapter_start_layer (or use fewer pipeline stages)")
        if trainable == 0:
            raise TrainingError("no parameter is trainable on this rank: freeze covers everything its pipeline stage "
                                "holds; freeze less")

    agree(check)
    fill_adapters(module, plan, state)
    default_compile = accelerator == "cuda" and cfg.zero_optimization.stage != 3  # ZeRO-3's hooks do not trace
    if compile_blocks(module, cfg.compile if cfg.compile is not None else default_compile):
        logger.info("compile: each transformer block runs through torch.compile (compiled at its first step)")
    groups = parameter_groups(module, cfg.optimizer.params.weight_decay, cfg.weight_decay_embeddings)
    zero = cfg.zero_optimization
    if zero.offload_optimizer != "none":  # DeepSpeed builds CPU Adam (and for NVMe its async I/O op) on first use
        from neox_llama.utils.extensions import clear_stale_build_lock

        for op in ("cpu_adam", "async_io") if "nvme" in (zero.offload_optimizer, zero.offload_param) else ("cpu_adam",):
            clear_stale_build_lock(op)
    with contextlib.redirect_stdout(io.StringIO()) as chatter:  # DeepSpeed prints memory reports on rank 0
        engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=groups, config=deepspeed_config(cfg, accelerator, zero_stage=stage),
            mpu=None if state.pp_size > 1 else state,
            lr_scheduler=(lambda optimizer: LRSchedule(optimizer, cfg)) if with_schedule else None,
        )
    if chatter.getvalue().strip():
        logger.debug("deepspeed.initialize printed:\n%s", chatter.getvalue().rstrip())
    if stage == 0 and cfg.precision == "fp32":
        keep_grad_norm(engine, one_rank=cfg.derived.world_size == 1)
    if cfg.derived.world_size == 1 and stage == 0:
        # One rank: DeepSpeed's gradient "all-reduce" would flatten every gradient into buckets, reduce over itself
        # and copy them back (4 % of an fp32 step at the benchmark shape). ZeRO 1-3 must keep it (their epilogue).
        engine.enable_backward_allreduce = False
    offload = [f"{what} offloaded to {device}" for what, device in (("optimizer state", zero.offload_optimizer),
                                                                     ("weights", zero.offload_param)) if device != "none"]
    logger.info("optimizer %s, ZeRO stage %s%s", type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__,
                zero_text(cfg, runs=stage), f" ({', '.join(offload)})" if offload else "")
    return TrainingEngine(engine, state, layer_factory(state), args, stage)
