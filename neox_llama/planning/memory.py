"""Per-rank memory estimate for ``deepy.py --dry-run`` and its host-memory check: model states under ZeRO, and
activations; on CPU also the rank process itself and its data-loader workers (baselines measured, see below).

An estimate, not a measurement: it counts the largest pipeline stage and ignores allocator slack. DeepSpeed's
communication buffers are counted at their configured sizes (reduce bucket, doubled with ``overlap_comm``;
allgather bucket at ZeRO 1/2; prefetched plus one gathered layer at ZeRO 3, twice on CPU, where a gather stages
the partitions beside the full tensor); ZeRO-Offload's share is reported apart and left out of the device total.
LoRA adapters with ``lora_dropout`` keep their dropped input and its mask per target.

Model states per parameter (ZeRO paper): fp32 training keeps weights 4 + gradients 4 + Adam 8 bytes;
mixed precision keeps 16-bit weights 2 + 16-bit gradients 2 + fp32 master weights and Adam 12 bytes, and
DeepSpeed's ZeRO optimizers also keep the fp32 gradient of the partition they update (4 bytes; measured by
benchmarks/memory.py, where the paper's 16 bytes per parameter left a 1-rank run 36 % above the estimate).
ZeRO stage 1 shards the optimizer part (fp32 gradient included) over data-parallel ranks, stage 2 also the
16-bit gradients, stage 3 also weights. torch's AdamW (on CPU, or ``optimizer.params.torch_adam``) adds a
step workspace of one fp32 temporary per updated element (its foreach kernels); DeepSpeed's fused GPU Adam none.

Activations stored for backward per transformer block and micro-batch, in elements (s = seq, b = micro
batch, h = hidden, I = intermediate, kv = key/value width, t = tensor-parallel size), assuming a fused
attention kernel (no s x s matrix): the block input, both norm inputs and outputs (4sbh), the query,
key, value and rotated query/key (sb(2h + 3kv)/t), attention output (sbh/t), and the MLP's gate, up,
activation and product (4sbI/t). Full checkpointing keeps only the input (sbh) of each group of
``checkpoint_num_layers`` blocks, plus one group's full set during recomputation; selective checkpointing keeps
everything but each block's attention core (the s x s terms below), plus one core while it is rebuilt. The
float32 logits and their gradient add 8sbV/t bytes. With a pipeline, the first stage holds up to min(pp, accumulation steps) micro-batches in flight (1F1B). The attention
core adds s x s terms (measured with torch 2.13's saved-tensor hooks): on CPU with ``attention_dropout`` > 0
PyTorch's math path keeps per head the scores, probabilities, dropped probabilities and boolean dropout mask
(heads x s^2 x (3 x bytes + 1)); otherwise document attention (``reset_attention_mask``, packed instruction
data) keeps its [b, 1, s, s] mask in the activation dtype; plain causal attention keeps nothing s x s.

Host memory at start-up (before the engine moves the model to its device; on CPU the model stays there): the
rank's model is built on the host in float32 and each parameter's full tensor is drawn before it is cut to the
rank's tensor-parallel shard; under ZeRO-3 the model is built partitioned (``deepspeed.zero.Init``), so a rank
holds its 1/dp share in the training precision plus one gathered layer and one full float32 tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from neox_llama.config.schema import Config
from neox_llama.planning.flops import count_parameters, count_trainable

GIB = 1024**3


CPU_RUNTIME = 400 * 2**20
"""A CPU rank's own resident memory besides the model terms below: Python with torch 2.13, DeepSpeed 0.19 and the
trainer imported and the process group up (249 MiB alone), then the engine, the optimizer, the loaders, the
allocator's arenas and the thread pools of a step. Measured with ``python -m benchmarks.rank_memory``
(docs/benchmarks.md; Intel Xeon, 2 cores, 2026-12-07): the peak RSS of a one-rank run of the tiny preset without
data-loader workers less what this estimate counts for its model: 369 and 387 MiB in fp32 (two runs), 473 MiB in bf16
(AMX); 422 MiB for the preset as shipped (bf16, vocabulary 2048; 459 MiB peak, 468 MB in the issue)."""

DATA_WORKER = 10 * 2**20
"""One data-loader worker (``num_workers``): forked from its rank, it shares the rank's pages and holds up to 9 MiB
of its own (USS, sampled every 0.05 s by the same benchmark; the rank with 6 workers peaked 24 MiB above the
same run without them, since the rank then reads no data itself)."""
EVALUATION_LOADERS = 2
"""Loaders besides training's whose workers can be alive at once when the run evaluates (``eval_iters`` > 0):
validation and test (evaluation keeps its loaders between evaluations)."""


@dataclass
class MemoryEstimate:
    """Bytes per rank on the most loaded pipeline stage."""

    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float
    checkpointing: bool
    startup_host: float = 0.0
    """Host RAM per rank while the model is built and loaded."""
    workspace: float = 0.0
    """The optimizer step's temporaries: torch's foreach AdamW makes one fp32 tensor per updated element."""
    buffers: float = 0.0
    """DeepSpeed's communication buffers: the gradient reduce bucket (twice with overlap_comm), the ZeRO 1/2
    allgather bucket, or under ZeRO-3 the gathered parameters (prefetch bucket plus the largest layer)."""
    offloaded_host: float = 0.0
    """Model states ZeRO-Offload keeps in host RAM instead of device memory (on GPUs; on CPU the host is the device)."""
    offloaded_nvme: float = 0.0
    """Model states ZeRO-Infinity keeps on NVMe (out of both)."""
    granularity: str = "full"
    runtime: float = 0.0
    """On CPU, the rank process itself (CPU_RUNTIME): its RSS counts against host RAM; a GPU's device memory does
    not hold it."""
    workers: float = 0.0
    """On CPU, the rank's data-loader workers (``num_workers`` per loader, DATA_WORKER each), in host RAM."""
    reference: float = 0.0
    """A preference run's frozen reference copy of the weights (full fine-tuning), placed like the policy's: this
    rank's tensor-parallel slice, its partition under ZeRO-3 (LoRA and Adapter runs use their base with the adapters
    switched off, no copy)."""

    @property
    def total(self) -> float:
        """Bytes per rank on its device (on CPU: host RAM, where everything lives)."""
        acts = self.activations_checkpointed if self.checkpointing else self.activations
        states = self.weights + self.gradients + self.optimizer + self.workspace + self.reference
        return states + acts + self.buffers + self.runtime + self.workers - self.offloaded_host - self.offloaded_nvme

    def text(self) -> str:
        chosen = f"with {self.granularity} activation checkpointing" if self.checkpointing else \
            "without activation checkpointing"
        offload = ""
        if self.offloaded_host or self.offloaded_nvme:
            offload = (f"; offloaded (not in the total): {self.offloaded_host / GIB:.2f} GiB to host RAM, "
                       f"{self.offloaded_nvme / GIB:.2f} GiB to NVMe")
        return (f"per-rank memory estimate ({self.parameters:,} parameters on the largest stage): "
                f"weights {self.weights / GIB:.2f} GiB, gradients {self.gradients / GIB:.2f} GiB, "
                f"optimizer {self.optimizer / GIB:.2f} GiB, optimizer step workspace {self.workspace / GIB:.2f} GiB, "
                f"{f'preference reference copy {self.reference / GIB:.2f} GiB, ' if self.reference else ''}"
                f"communication buffers {self.buffers / GIB:.2f} GiB, "
                f"{f'process runtime {self.runtime / GIB:.2f} GiB, ' if self.runtime else ''}"
                f"{f'data-loader workers {self.workers / GIB:.2f} GiB ({self.workers / DATA_WORKER:.0f} x {DATA_WORKER / 2**20:.0f} MiB), ' if self.workers else ''}"
                f"activations {self.activations / GIB:.2f} GiB "
                f"without checkpointing / {self.activations_checkpointed / GIB:.2f} GiB with ({self.granularity}); "
                f"total {self.total / GIB:.2f} GiB ({chosen}){offload}; host RAM at start-up "
                f"{self.startup_host / GIB:.2f} GiB")


def estimate_memory(cfg: Config, accelerator: str = "cpu") -> MemoryEstimate:
    """Estimate for a resolved config whose vocabulary size is known, on ``accelerator`` (cpu or cuda)."""
    d = cfg.derived
    count = count_parameters(cfg)
    tp, pp, dp = cfg.model_parallel_size, cfg.pipe_parallel_size, d.data_parallel_size
    blocks_per_stage = math.ceil(cfg.num_layers / pp)
    norm = count.final_norm
    sharded_block = count.per_layer - 2 * norm
    block = sharded_block / tp + 2 * norm
    if pp > 1:  # the last stage holds the head, or its own copy of a tied embedding
        first = count.embedding / tp + blocks_per_stage * block
        last = blocks_per_stage * block + norm + count.head_compute / tp
        params = int(max(first, last))
    else:
        params = int(count.embedding / tp + cfg.num_layers * block + norm + count.head / tp)

    mixed = cfg.precision != "fp32"
    weight_bytes, grad_bytes, optim_bytes = (2, 2, 12) if mixed else (4, 4, 8)
    # Gradients and optimizer state exist only for what trains (LoRA or Adapter tensors, or the base minus `freeze`).
    fraction = count_trainable(cfg).fraction if (cfg.lora_r or cfg.freeze or cfg.peft_method != "lora") else 1.0
    stage = cfg.derived.engine_zero_stage
    weights = params * weight_bytes / (dp if stage >= 3 else 1)
    gradients = params * fraction * grad_bytes / (dp if stage >= 2 else 1)
    if mixed:  # the optimizer's fp32 copy of its partition's gradient
        gradients += params * fraction * 4 / (dp if stage >= 1 else 1)
    optimizer = params * fraction * optim_bytes / (dp if stage >= 1 else 1)

    s, b, h = cfg.seq_length, d.train_micro_batch_size_per_gpu, cfg.hidden_size
    if cfg.preference_loss:  # a micro-batch of pairs runs both answers: twice its rows
        b *= 2
    kv = d.num_kv_heads * d.head_dim
    act_bytes = 2 if mixed else 4
    per_block = s * b * (4 * h + (3 * h + 3 * kv + 4 * d.intermediate_size) / tp) * act_bytes
    attention_core = 0.0  # what selective checkpointing recomputes instead of keeping (measured on torch 2.13)
    if cfg.attention_dropout > 0 and accelerator != "cuda":
        # CPU attention with dropout takes PyTorch's math path: per head the probabilities, the dropped
        # probabilities, the scores and the boolean dropout mask, each s x s
        attention_core = b * cfg.num_attention_heads / tp * s * s * (3 * act_bytes + 1)
    elif cfg.reset_attention_mask or (cfg.sft_data_path and cfg.sft_packing):
        # Document attention's [b, 1, s, s] mask, kept by the fused kernel as an additive mask in the activation dtype
        attention_core = b * s * s * act_bytes
    per_block += attention_core
    if cfg.lora_r and cfg.lora_dropout > 0:  # each adapter keeps its dropped input and the boolean mask
        widths = {"query": h, "key": h, "value": h, "output": h / tp, "gate": h, "up": h, "down": d.intermediate_size / tp}
        paths = set(cfg.lora_targets) - {"mlp"} | ({"gate", "up", "down"} if "mlp" in cfg.lora_targets else set())
        per_block += s * b * sum(widths.get(t, 0) for t in paths) * (act_bytes + 1)
    vocab_rows = s * b * (d.padded_vocab_size or 0) / tp
    if tp == 1:  # the logits and their gradient in the activation dtype, one float32 chunk at a time beside them
        from neox_llama.model.cross_entropy import CHUNK_ELEMENTS

        logits = 2 * act_bytes * vocab_rows + 8 * min(CHUNK_ELEMENTS, vocab_rows)
    else:  # the vocabulary-parallel cross-entropy works on float32 copies of this rank's shard
        logits = 8 * vocab_rows
    in_flight = min(pp, d.gradient_accumulation_steps) if pp > 1 else 1
    full = (blocks_per_stage * per_block) * in_flight + logits
    if cfg.checkpoint_granularity == "selective":  # every block keeps all but its attention core; one core rebuilt
        checkpointed = blocks_per_stage * (per_block - attention_core) * in_flight + attention_core + logits
    else:  # each group of checkpoint_num_layers blocks keeps its input; one group is rebuilt at a time
        group = min(cfg.checkpoint_num_layers, blocks_per_stage)
        checkpointed = math.ceil(blocks_per_stage / group) * s * b * h * act_bytes * in_flight + group * per_block + logits
    largest_tensor = max(count.embedding, count.head_compute, d.intermediate_size * h) * 4
    largest_layer = max(sharded_block / tp + 2 * norm, count.embedding / tp)  # as this rank holds it
    if stage >= 3:
        startup = params * weight_bytes / dp + largest_layer * weight_bytes + largest_tensor
    else:
        startup = params * 4 + largest_tensor
    zero = cfg.zero_optimization
    torch_adam = cfg.optimizer.params.torch_adam if cfg.optimizer.params.torch_adam is not None else \
        accelerator != "cuda"
    if zero.offload_optimizer != "none":
        torch_adam = False  # ZeRO-Offload steps with DeepSpeedCPUAdam, in place
    # torch's foreach AdamW makes one fp32 temporary per updated element; its fused kernel (the default) none
    foreach = torch_adam and not cfg.optimizer.params.fused
    workspace = params * fraction * 4 / (dp if stage >= 1 else 1) if foreach else 0.0

    default_bucket = 5e8 if accelerator == "cuda" else 5e7  # config/deepspeed_json.py's null
    reduce_bucket = zero.reduce_bucket_size or default_bucket
    buffers = min(reduce_bucket, params * fraction) * grad_bytes * (2 if zero.overlap_comm else 1) if stage >= 1 else 0.0
    if stage == 3:
        prefetch = 5e7 if zero.stage3_prefetch_bucket_size is None else zero.stage3_prefetch_bucket_size
        # a gather stages the partitions beside the full tensor on CPU (measured: 2x the 16-bit layer)
        buffers += min(prefetch + largest_layer, params) * weight_bytes * (1 if accelerator == "cuda" else 2)
    elif stage >= 1:
        buffers += min(zero.allgather_bucket_size or default_bucket, params) * weight_bytes

    # ZeRO-Offload: the optimizer's partition (its fp32 master weights, Adam moments and fp32 gradients) and, at
    # stage 3, the weights' partition live off the device. On CPU "host" is the device: only NVMe moves anything.
    moved_optimizer = optimizer + (params * fraction * 4 / (dp if stage >= 1 else 1) if mixed else 0.0)
    host = nvme = 0.0
    for device, amount in ((zero.offload_optimizer, moved_optimizer), (zero.offload_param, weights)):
        if device == "nvme":
            nvme += amount
        elif device == "cpu" and accelerator == "cuda":
            host += amount
    runtime = CPU_RUNTIME if accelerator != "cuda" else 0.0
    loaders = 1 + (EVALUATION_LOADERS if cfg.eval_iters else 0)
    workers = cfg.num_workers * loaders * DATA_WORKER if accelerator != "cuda" else 0.0
    full_reference = cfg.preference_loss and not cfg.lora_r and cfg.peft_method not in ("adapter", "adapter_v2") \
        and cfg.preference_reference == "model" and cfg.preference_loss != "rm"  # precomputed, rm: no copy
    reference = weights if full_reference else 0.0  # placed like the policy: sliced by tp, partitioned by ZeRO-3
    if full_reference and stage == 3:  # its own engine gathers ahead of its forward: the prefetch bucket (measured)
        reference += min(5e7 if zero.stage3_prefetch_bucket_size is None else zero.stage3_prefetch_bucket_size,
                         params) * weight_bytes
    return MemoryEstimate(params, weights, gradients, optimizer, full, checkpointed, cfg.checkpoint_activations,
                          startup, workspace, buffers, host, nvme, cfg.checkpoint_granularity, runtime, workers,
                          reference)
