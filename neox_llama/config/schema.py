"""The configuration schema: every key a YAML file may set, grouped by concern.

Keys are flat, as in GPT-NeoX: a YAML file says ``hidden_size: 4096``, not ``model: {hidden_size: 4096}``.
The groups below only organise the code and the generated reference (``docs/config.md``); the
final :class:`Config` inherits every group, so ``cfg.hidden_size`` and ``cfg.optimizer.params.lr`` work.
A few keys hold a small mapping of their own (``optimizer``, ``zero_optimization``, ``rope_scaling``);
those are typed dataclasses too, and a command line reaches inside them with dots
(``optimizer.params.lr=1e-4``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from neox_llama.config.fields import doc_field

NormType = Literal["rmsnorm", "layernorm"]
PosEmbType = Literal["rotary", "learned", "none"]
ActivationType = Literal["swiglu", "gelu"]
PrecisionType = Literal["bf16", "fp16", "fp32", "auto"]
TokenizerType = Literal["SPMTokenizer", "Llama3Tokenizer", "HFTokenizer"]
LRDecayStyle = Literal["cosine", "linear", "constant", "inverse_sqrt"]
PromptStyle = Literal["alpaca", "llama2-chat", "llama3-chat", "plain"]
LoraTarget = Literal["query", "key", "value", "output", "mlp", "gate", "up", "down", "head"]
PeftMethod = Literal["lora", "adapter", "adapter_v2"]
PreferenceLoss = Literal["dpo", "ipo", "kto", "rm"]
AdapterGate = Literal["per_layer", "per_head"]
LauncherType = Literal["pdsh", "openmpi", "mvapich", "slurm", "impi"]
OffloadDevice = Literal["none", "cpu", "nvme"]


# --------------------------------------------------------------------------- nested mappings
@dataclass
class RopeScaling:
    """Rotary context extension, as transformers' Llama reads it from ``config.json`` (``rope_parameters``)."""

    rope_type: Literal["linear", "dynamic", "yarn", "longrope", "llama3"] = doc_field("llama3", "Scaling rule: linear (position interpolation), dynamic (NTK base growth past max_position_embeddings, at inference), yarn, longrope, or llama3 (Llama-3.1's frequency bands).")
    factor: float | None = doc_field(8.0, "Context extension factor (llama3: wavelength stretch of low frequencies); yarn/longrope: null = max_position_embeddings / original_max_position_embeddings.", minimum=1.0)
    low_freq_factor: float = doc_field(1.0, "llama3: wavelengths above original_max_position_embeddings / this are fully scaled.", minimum=0.0)
    high_freq_factor: float = doc_field(4.0, "llama3: wavelengths below original_max_position_embeddings / this are left alone.", minimum=0.0)
    original_max_position_embeddings: int = doc_field(8192, "llama3, yarn, longrope: the context length the rotary base was trained for.", minimum=1)
    attention_factor: float | None = doc_field(None, "yarn, longrope: factor on cos/sin; null = the paper's rule from factor.", minimum=0.0)
    beta_fast: float | None = doc_field(None, "yarn: rotations above which dimensions extrapolate (null = 32).", minimum=0.0)
    beta_slow: float | None = doc_field(None, "yarn: rotations below which dimensions interpolate (null = 1).", minimum=0.0)
    mscale: float | None = doc_field(None, "yarn: with mscale_all_dim, the attention factor's numerator scale.", minimum=0.0)
    mscale_all_dim: float | None = doc_field(None, "yarn: with mscale, the attention factor's denominator scale.", minimum=0.0)
    truncate: bool = doc_field(True, "yarn: round the correction range to whole dimensions.")
    long_factor: list[float] = doc_field([], "longrope: per-frequency divisors past original_max_position_embeddings (rotary dims / 2 values).")
    short_factor: list[float] = doc_field([], "longrope: per-frequency divisors within original_max_position_embeddings (rotary dims / 2 values).")


@dataclass
class OptimizerParams:
    """Hyper-parameters of the optimizer."""

    lr: float = doc_field(3.0e-4, "Peak learning rate reached after warmup.", minimum=0.0)
    betas: list[float] = doc_field([0.9, 0.95], "Adam beta1 and beta2.")
    eps: float = doc_field(1.0e-8, "Adam epsilon.", minimum=0.0)
    weight_decay: float = doc_field(0.1, "Decoupled weight decay, applied to matrices only (see weight_decay_embeddings).", minimum=0.0)
    torch_adam: bool | None = doc_field(None, "Use torch's AdamW instead of DeepSpeed's fused CUDA Adam (nothing for DeepSpeed to compile at start-up); null: torch's on CPU, fused on GPUs.")
    fused: bool = doc_field(True, "With torch's AdamW (torch_adam): its fused kernel (one pass over each tensor, no foreach temporaries; 5x faster than foreach on CPU at the benchmark shape) instead of its foreach implementation.")


@dataclass
class OptimizerConfig:
    """Optimizer choice, written like GPT-NeoX: ``optimizer: {type: AdamW, params: {lr: 3.0e-4}}``."""

    type: Literal["AdamW", "Adam"] = doc_field("AdamW", "AdamW (decoupled decay) or Adam (L2 decay).")
    params: OptimizerParams = doc_field(OptimizerParams(), "See the optimizer.params keys.")


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings, passed to the engine's ``zero_optimization`` section."""

    stage: int = doc_field(1, "ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + weights sharded over data parallel. A one-rank fp32 run at 1 or 2 (without offload) runs 0: nothing to partition, and stage 0 skips ZeRO's copies.", minimum=0, maximum=3)
    allgather_partitions: bool = doc_field(True, "Gather updated partitions with allgather (else broadcasts).")
    allgather_bucket_size: int | None = doc_field(None, "Elements gathered at once; null: 5e8 on GPUs, 5e7 on CPU (each bucket is a buffer in host memory there).", minimum=1)
    reduce_scatter: bool = doc_field(True, "Average gradients with reduce-scatter (else all-reduce).")
    reduce_bucket_size: int | None = doc_field(None, "Elements reduced at once; null: 5e8 on GPUs, 5e7 on CPU.", minimum=1)
    overlap_comm: bool = doc_field(False, "Overlap gradient reduction with the backward pass.")
    contiguous_gradients: bool = doc_field(True, "Copy gradients into one buffer as they are produced.")
    offload_optimizer: OffloadDevice = doc_field("none", "ZeRO-Offload: keep the optimizer's partition (fp32 master weights, Adam moments, fp32 gradients) in host memory (cpu) or, at ZeRO 3, on NVMe (nvme, needs nvme_path), stepped there by DeepSpeedCPUAdam (compiled by DeepSpeed on first use); ZeRO >= 1.")
    offload_param: OffloadDevice = doc_field("none", "ZeRO-3 only: keep the weights' partition in host memory (cpu) or on NVMe (nvme, needs nvme_path), gathered to the device layer by layer.")
    nvme_path: str | None = doc_field(None, "Folder on a fast local NVMe drive for offload_optimizer/offload_param nvme (needs DeepSpeed's async_io op: libaio-dev installed).")
    stage3_prefetch_bucket_size: int | None = doc_field(None, "ZeRO 3: elements of the next layers gathered ahead of use; null: DeepSpeed's 5e7. 0 keeps host memory lowest on CPU, but hangs DeepSpeed 0.19 when forward passes vary between ranks (lm-eval tasks during training).", minimum=0)
    stage3_max_live_parameters: int | None = doc_field(None, "ZeRO 3: at most this many gathered elements kept at once; null: DeepSpeed's 1e9.", minimum=0)
    stage3_max_reuse_distance: int | None = doc_field(None, "ZeRO 3: keep a gathered parameter if it is used again within this many elements; null: DeepSpeed's 1e9 (0: see stage3_prefetch_bucket_size).", minimum=0)
    stage3_param_persistence_threshold: int = doc_field(100_000, "ZeRO 3: tensors with fewer elements than this stay whole on every rank (DeepSpeed's default 1e5); 0 partitions every tensor.", minimum=0)


# --------------------------------------------------------------------------- groups
@dataclass
class ModelArgs:
    """Model architecture."""

    model_name: str | None = doc_field(None, "Pick a preset by name (e.g. Llama-2-7b-hf, Meta-Llama-3-8B, Llama-3.2-1B) instead of listing its file.")
    num_layers: int | None = doc_field(None, "Number of transformer blocks (required).", minimum=1)
    hidden_size: int | None = doc_field(None, "Model width (required).", minimum=1)
    num_attention_heads: int | None = doc_field(None, "Query heads (required).", minimum=1)
    num_kv_heads: int | None = doc_field(None, "Key/value heads for grouped-query attention; unset = num_attention_heads (MHA), 1 = MQA.", minimum=1)
    intermediate_size: int | None = doc_field(None, "MLP hidden width exactly as Hugging Face (11008 for Llama-2-7B); unset = 4 x hidden_size for gelu, required for swiglu.", minimum=1)
    seq_length: int | None = doc_field(None, "Training sequence length in tokens (required).", minimum=1)
    max_position_embeddings: int | None = doc_field(None, "Longest sequence the model supports; unset = seq_length.", minimum=1)
    vocab_size: int | None = doc_field(None, "Tokenizer vocabulary size before padding; unset = taken from the tokenizer.", minimum=1)
    make_vocab_size_divisible_by: int = doc_field(128, "Embedding rows are padded up to a multiple of this (padded rows are trimmed on export).", minimum=1)
    norm: NormType = doc_field("rmsnorm", "Normalisation layer.")
    rms_norm_epsilon: float = doc_field(1.0e-5, "Epsilon of RMSNorm.", minimum=0.0)
    layernorm_epsilon: float = doc_field(1.0e-5, "Epsilon of LayerNorm.", minimum=0.0)
    pos_emb: PosEmbType = doc_field("rotary", "Positional encoding: rotary (RoPE), learned absolute, or none.")
    rotary_emb_base: float = doc_field(10000.0, "RoPE base theta (10000 for Llama-2, 500000 for Llama-3).", minimum=1.0)
    rotary_pct: float = doc_field(1.0, "Fraction of each head's dimensions that rotary embeddings rotate.", minimum=0.0, maximum=1.0)
    rope_scaling: RopeScaling | None = doc_field(None, "Rotary context extension: rope_type linear, dynamic, yarn, longrope or llama3 with its parameters (the keys below), as in Hugging Face config.json.")
    activation: ActivationType = doc_field("swiglu", "MLP activation: swiglu (gated, three matrices) or gelu (two matrices).")
    use_bias_in_attn_linear: bool = doc_field(False, "Biases on the query/key/value/output projections.")
    use_bias_in_mlp: bool = doc_field(False, "Biases on the MLP projections.")
    no_weight_tying: bool = doc_field(True, "True: separate output head (Llama-2/3); false: head shares the embedding matrix (Llama-3.2).")
    reward_head: bool = doc_field(False, "The model ends in a reward model's scalar score head (transformers' LlamaForSequenceClassification with num_labels 1) instead of the vocabulary head: set by convert_from_hf.py for such a model; preference_loss rm implies it.")
    init_method_std: float = doc_field(0.02, "Standard deviation of the normal initialisation.", minimum=0.0)
    attention_dropout: float = doc_field(0.0, "Dropout on attention probabilities.", minimum=0.0, maximum=1.0)
    hidden_dropout: float = doc_field(0.0, "Dropout on each block's residual branches.", minimum=0.0, maximum=1.0)


@dataclass
class ParallelArgs:
    """Parallel layout: world size = pipe_parallel_size x model_parallel_size x data parallel (derived)."""

    pipe_parallel_size: int = doc_field(1, "Pipeline stages; 1 = no pipeline (ZeRO 2/3 become available).", minimum=1)
    model_parallel_size: int = doc_field(1, "Tensor-parallel degree (heads and MLP columns split across ranks).", minimum=1)
    pipe_partition_method: str = doc_field("type:TransformerBlock", "How layers are split over stages (DeepSpeed: type:REGEX, parameters, uniform).")


@dataclass
class PrecisionArgs:
    """Numeric precision and ZeRO."""

    precision: PrecisionType = doc_field("bf16", "Training precision; fp16 uses dynamic loss scaling and needs a GPU; auto = bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX-512-BF16 or AMX), else fp32 (a CPU without them emulates bf16 several times slower than fp32).")
    loss_scale: float = doc_field(0.0, "fp16 only: 0 = dynamic loss scaling, else a fixed scale.", minimum=0.0)
    initial_scale_power: int = doc_field(16, "fp16 only: dynamic loss scale starts at 2**this.", minimum=0)
    loss_scale_window: int = doc_field(1000, "fp16 only: steps without overflow before the scale grows.", minimum=1)
    hysteresis: int = doc_field(2, "fp16 only: overflows tolerated before the scale shrinks.", minimum=1)
    min_loss_scale: float = doc_field(1.0, "fp16 only: lower bound of the dynamic loss scale.", minimum=0.0)
    zero_optimization: ZeroConfig = doc_field(ZeroConfig(), "See the zero_optimization keys.")


@dataclass
class OptimizerArgs:
    """Optimizer, clipping and learning-rate schedule."""

    optimizer: OptimizerConfig = doc_field(OptimizerConfig(), "See the optimizer keys.")
    weight_decay_embeddings: bool = doc_field(False, "Also decay embedding and head matrices (norms and biases never decay).")
    gradient_clipping: float = doc_field(1.0, "Clip the global gradient norm to this; 0 = off.", minimum=0.0)
    min_lr: float = doc_field(0.0, "Learning rate at the end of decay.", minimum=0.0)
    lr_decay_style: LRDecayStyle = doc_field("cosine", "Decay after warmup.")
    lr_decay_iters: int | None = doc_field(None, "Steps over which the rate decays to min_lr; unset = train_iters.", minimum=1)
    warmup: float = doc_field(0.01, "Linear warmup as a fraction of lr_decay_iters (ignored when warmup_iters is set).", minimum=0.0, maximum=1.0)
    warmup_iters: int | None = doc_field(None, "Linear warmup in steps; overrides warmup.", minimum=0)


@dataclass
class TrainingArgs:
    """Batch sizes and the training loop."""

    train_micro_batch_size_per_gpu: int | None = doc_field(None, "Sequences per rank per forward pass; any two of the three batch keys determine the third.", minimum=1)
    gradient_accumulation_steps: int | None = doc_field(None, "Micro-batches accumulated per optimizer step.", minimum=1)
    train_batch_size: int | None = doc_field(None, "Sequences per optimizer step over all data-parallel ranks.", minimum=1)
    train_iters: int = doc_field(1000, "Optimizer steps to train for.", minimum=0)
    eval_interval: int = doc_field(1000, "Evaluate on the validation split every this many steps.", minimum=1)
    eval_iters: int = doc_field(10, "Validation batches per evaluation.", minimum=0)
    eval_tasks: list[str] = doc_field([], "lm-evaluation-harness tasks run on the training model at every evaluation (requests split over data-parallel ranks), their metrics logged as TASK/METRIC beside valid_loss; needs a tokenizer and pipe_parallel_size = model_parallel_size = 1 (evaluate other layouts' checkpoints with tools/evaluate.py --tasks).")
    eval_tasks_include_path: str | None = doc_field(None, "A folder of local lm-eval task YAMLs that eval_tasks may name (e.g. dataset_path: json with local data_files).")
    eval_tasks_limit: int | None = doc_field(None, "At most this many documents per eval_tasks task at each evaluation; unset = all.", minimum=1)
    eval_tasks_num_fewshot: int | None = doc_field(None, "Few-shot examples for eval_tasks; unset = each task's default.", minimum=0)
    eval_tasks_batch_size: int = doc_field(8, "Sequences per forward pass when scoring eval_tasks requests.", minimum=1)
    log_interval: int = doc_field(10, "Log training metrics every this many steps.", minimum=1)
    seed: int = doc_field(1234, "Seed for initialisation, data order and dropout.", minimum=0)
    checkpoint_activations: bool = doc_field(False, "Recompute activations in backward to save memory.")
    checkpoint_num_layers: int = doc_field(1, "Transformer blocks per activation-checkpoint segment (checkpoint_granularity full).", minimum=1)
    checkpoint_granularity: Literal["full", "selective"] = doc_field("full", "What checkpoint_activations recomputes: full = whole groups of checkpoint_num_layers blocks (only each group's input is kept); selective = only each block's attention core (scores, softmax, weighted sum; Megatron's selective recomputation): keeps the s x s scores and probabilities out of memory where attention runs PyTorch's math path (attention_dropout > 0 on CPU) and document attention's s x s mask everywhere, for one extra attention pass.")
    compile: bool | None = doc_field(None, "torch.compile each transformer block (the same code for every block, compiled once); unset = on when training on CUDA GPUs (except under ZeRO-3), off on CPU (there inductor's C++ kernels measured 0.89x eager in fp32 at the benchmark shape, before their compile time; docs/benchmarks.md). Tested with a pipeline and activation checkpointing (full and selective); refused with ZeRO-3.")
    peak_tflops: float | None = doc_field(None, "Per-rank peak TFLOP/s for MFU and HFU; unset = the datasheet dense 16-bit peak of a known GPU (A100, H100, H200, L40S, A10G), else measured at start-up.", minimum=0.0)
    wall_clock_breakdown: bool = doc_field(False, "Ask DeepSpeed to time forward, backward and optimizer step.")
    distributed_timeout_minutes: float = doc_field(10.0, "Process-group timeout: a collective waiting longer than this fails the run instead of hanging it.", minimum=0.1)


@dataclass
class DataArgs:
    """Pretraining data (memory-mapped .bin/.idx datasets made by tools/preprocess_data.py)."""

    data_path: str | None = doc_field(None, "One dataset prefix (without .bin/.idx), split into train/valid/test by `split`.")
    train_data_paths: list[str] = doc_field([], "Dataset prefixes for training (instead of data_path).")
    valid_data_paths: list[str] = doc_field([], "Dataset prefixes for validation.")
    test_data_paths: list[str] = doc_field([], "Dataset prefixes for testing.")
    train_data_weights: list[float] = doc_field([], "Blend weights of train_data_paths; empty = proportional to size.")
    valid_data_weights: list[float] = doc_field([], "Blend weights of valid_data_paths.")
    test_data_weights: list[float] = doc_field([], "Blend weights of test_data_paths.")
    split: str = doc_field("969,30,1", "Train,valid,test proportions of data_path.")
    num_workers: int = doc_field(2, "Data loader worker processes per rank.", minimum=0)
    reset_position_ids: bool = doc_field(False, "Restart position ids after each end-of-document token.")
    reset_attention_mask: bool = doc_field(False, "Tokens attend only within their own document (needs reset_position_ids).")
    eod_mask_loss: bool = doc_field(False, "No loss at end-of-document positions (no prediction across a document boundary).")
    train_label_data_paths: list[str] = doc_field([], "Label datasets parallel to train_data_paths (GPT-NeoX's *_label_document: int32 ids, -100 = no loss), e.g. made by preprocess_data.py --instruction.")
    valid_label_data_paths: list[str] = doc_field([], "Label datasets parallel to valid_data_paths.")
    test_label_data_paths: list[str] = doc_field([], "Label datasets parallel to test_data_paths.")


@dataclass
class FinetuneArgs:
    """Fine-tuning: full or LoRA, on instruction data (JSON records) or token data (see docs/finetuning.md)."""

    finetune: bool = doc_field(False, "Start from the weights of `load` (fresh optimizer, step 0, new data); re-running the same command resumes from `save` once it holds a checkpoint of this fine-tune.")
    freeze: list[str] = doc_field([], "Parameters kept fixed and out of the optimizer: embeddings, head, final_norm, norms, attention, mlp, layers.I or layers.I-J (blocks from 0), optionally followed by .attention/.mlp/.norms (e.g. layers.0-11.mlp).")
    sft_data_path: str | None = doc_field(None, "Instruction data: a JSON list or JSONL of Alpaca records (instruction, optional input, output) or chat records (messages: [{role, content}], roles system/user/assistant); replaces data_path.")
    sft_valid_data_path: str | None = doc_field(None, "Validation instruction data; unset = val_split_fraction of sft_data_path is held out.")
    val_split_fraction: float = doc_field(0.05, "Fraction of sft_data_path held out for validation (seeded; at least one record when > 0 and there are 2 or more).", minimum=0.0, maximum=1.0)
    prompt_style: PromptStyle | None = doc_field(None, "Template that renders records: alpaca, llama2-chat, llama3-chat or plain; unset = alpaca for Alpaca records, the model family's chat style for chat records. Saved with the checkpoint.")
    mask_prompt: bool = doc_field(True, "Loss on response tokens only (every assistant turn of a chat); LitGPT defaults to false (loss on the prompt too).")
    sft_packing: bool = doc_field(False, "Pack whole records into each seq_length sample (positions restart, attention stays within a record); false = one record per sample, padded.")
    preference_loss: PreferenceLoss | None = doc_field(None, "Preference tuning on preference_data_path: dpo (the sigmoid loss; Rafailov et al.), ipo (TRL's form: log-probabilities averaged per response token) on pairs, kto (Ethayarajh et al.; TRL's form) on unpaired completions with a boolean label, or rm (a reward model: a scalar score head on the last token, the Bradley-Terry loss on pairs, TRL's RewardTrainer); unset = no preference tuning. The reference model is the frozen base with the adapters switched off (LoRA, Adapter) or a frozen copy of the starting weights (full fine-tuning).")
    preference_data_path: str | None = doc_field(None, "Preference pairs: a JSON list or JSONL of {prompt, chosen, rejected} records (strings, or messages), chosen/rejected conversations sharing a prefix, or LLaMA-Factory's ShareGPT pairs (conversations + chosen/rejected); for kto, labelled completions: {messages, label} (LLaMA-Factory's KTO format) or {prompt, completion, label}; replaces data_path.")
    preference_valid_data_path: str | None = doc_field(None, "Validation pairs (kto: labelled completions); unset = val_split_fraction of preference_data_path is held out.")
    dpo_beta: float = doc_field(0.1, "Beta of DPO, IPO and KTO: how far the policy may move from the reference (larger = closer).", minimum=0.0)
    dpo_label_smoothing: float = doc_field(0.0, "Conservative DPO's label smoothing: the share of pairs assumed mislabelled, in [0, 0.5) (dpo only).", minimum=0.0, maximum=0.5)
    rpo_alpha: float = doc_field(0.0, "Weight of an SFT term (mean negative log-likelihood of the chosen responses' tokens) added to the preference loss (TRL's rpo_alpha).", minimum=0.0)
    preference_reference: Literal["model", "precomputed"] = doc_field("model", "Where DPO/IPO's reference log-probabilities come from: model = the reference model in every step; precomputed = computed once before training (each data-parallel rank its share of the pairs, training and validation), written beside the data keyed by the base's fingerprint and the tokenised pairs, read back by later runs; training then holds no reference copy and runs no reference forward. Not for kto (its mismatched rows depend on the micro-batch).")
    rm_margin_key: str | None = doc_field(None, "rm: the record field holding a margin the chosen score must beat the rejected one by (loss -log sigmoid(r_chosen - r_rejected - margin), TRL's margin column); unset = no margin.")
    kto_desirable_weight: float = doc_field(1.0, "KTO: the weight of a desirable completion's loss (TRL's desirable_weight).", minimum=0.0)
    kto_undesirable_weight: float = doc_field(1.0, "KTO: the weight of an undesirable completion's loss (TRL's undesirable_weight).", minimum=0.0)


@dataclass
class TokenizerArgs:
    """Tokenizer."""

    tokenizer_type: TokenizerType | None = doc_field(None, "SPMTokenizer (sentencepiece .model), Llama3Tokenizer (tiktoken tokenizer.model) or HFTokenizer (tokenizer.json).")
    vocab_file: str | None = doc_field(None, "Path of the tokenizer file.")


@dataclass
class CheckpointArgs:
    """Saving and loading checkpoints."""

    save: str | None = doc_field(None, "Directory for checkpoints (global_stepN/ and latest); unset = never save.")
    load: str | None = doc_field(None, "Checkpoint directory to resume or fine-tune from.")
    checkpoint_factor: int = doc_field(1000, "Save every this many steps (and at the end).", minimum=1)
    keep_last_n_checkpoints: int | None = doc_field(None, "Delete older checkpoints beyond this many; unset = keep all.", minimum=1)
    save_best: bool = doc_field(False, "Also keep the checkpoint with the lowest validation loss as best/.")
    early_stopping_patience: int | None = doc_field(None, "Stop after this many evaluations without improvement; unset = never.", minimum=1)


@dataclass
class LoggingArgs:
    """Metrics and logs."""

    log_dir: str | None = doc_field(None, "Where metrics.jsonl and the launched config go; unset = {save}/logs, or runs/<time>/logs without save.")
    tensorboard_dir: str | None = doc_field(None, "Write TensorBoard events here; unset = off.")
    use_wandb: bool = doc_field(False, "Log to Weights & Biases (WANDB_MODE=offline works without network).")
    wandb_project: str = doc_field("neox_llama", "W&B project.")
    wandb_group: str | None = doc_field(None, "W&B run group.")
    log_level: Literal["debug", "info", "warning", "error"] = doc_field("info", "Verbosity of rank 0's console log.")


@dataclass
class LauncherArgs:
    """How deepy.py starts the ranks (DeepSpeed's launcher)."""

    num_gpus: int | None = doc_field(None, "Ranks per node (GPUs; CPU processes on a machine without CUDA); unset = all GPUs, or pp x tp on CPU.", minimum=1)
    num_nodes: int | None = doc_field(None, "Nodes to use from the hostfile; unset = all of them (1 without a hostfile).", minimum=1)
    hostfile: str | None = doc_field(None, "DeepSpeed hostfile (`host slots=N` per line) for multi-node runs.")
    include: str | None = doc_field(None, "DeepSpeed --include filter, e.g. `worker-0:0,1@worker-1`.")
    exclude: str | None = doc_field(None, "DeepSpeed --exclude filter.")
    master_addr: str | None = doc_field(None, "Address of rank 0; unset = the launcher's choice (127.0.0.1 on one node).")
    master_port: int = doc_field(29500, "TCP port of rank 0. On one node a port already in use is replaced by a free one (a warning names both); on several nodes it is an error.", minimum=1, maximum=65535)
    launcher: LauncherType = doc_field("pdsh", "Multi-node launcher backend.")
    omp_num_threads: int | None = doc_field(None, "Threads per rank; unset = the CPU cores this process may use (its affinity mask, e.g. a container's cpuset) / ranks on the node.", minimum=1)
    bind_cores: bool = doc_field(True, "CPU ranks sharing a machine each run on their own omp_num_threads cores (local rank i on cores i x threads ...), so their thread pools do not contend; only where the machine has that many cores available.")


@dataclass
class LoraArgs:
    """Parameter-efficient fine-tuning on a frozen base. LoRA: each targeted matrix W gains (lora_alpha / lora_r) x
    B A. Adapter (v1, v2): see peft_method."""

    lora_r: int = doc_field(0, "LoRA rank; 0 = off (full fine-tuning). Needs load (the base checkpoint).", minimum=0)
    lora_alpha: float = doc_field(16.0, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.", minimum=0.0)
    lora_dropout: float = doc_field(0.05, "Dropout on the LoRA input (training only).", minimum=0.0, maximum=1.0)
    lora_targets: list[LoraTarget] = doc_field(["query", "value"], "Matrices that get adapters: query, key, value, output (attention), mlp (gate, up and down together), gate, up, down (one MLP projection each, as PEFT's gate_proj, up_proj, down_proj), head (refused while the head is tied to the embedding).")
    peft_method: PeftMethod = doc_field("lora", "Parameter-efficient method: lora (on when lora_r > 0), adapter (LLaMA-Adapter: a learned prompt per top layer, mixed into attention through a zero-initialised gate) or adapter_v2 (adapter, plus a learned scale and bias on every linear layer and trainable norms). adapter and adapter_v2 need load (the base).")
    adapter_prompt_length: int = doc_field(10, "adapter / adapter_v2: learned prompt tokens per adapted layer.", minimum=1)
    adapter_start_layer: int = doc_field(2, "adapter / adapter_v2: the first block (from 0) that gets a prompt; every later one does too.", minimum=0)
    adapter_gate: AdapterGate = doc_field("per_layer", "adapter / adapter_v2: one zero-initialised gate per layer (as PEFT's adaption_prompt, exportable to PEFT) or one per attention head (as LitGPT; not exportable).")


GROUPS: tuple[type, ...] = (
    ModelArgs, ParallelArgs, PrecisionArgs, OptimizerArgs, TrainingArgs, DataArgs,
    FinetuneArgs, TokenizerArgs, CheckpointArgs, LoggingArgs, LauncherArgs, LoraArgs,
)
"""Groups in the order the reference documents them."""


@dataclass
class Derived:
    """Values computed from the config and the world size, never set by users."""

    world_size: int = doc_field(1, "Ranks in the run.")
    data_parallel_size: int = doc_field(1, "world_size / (pipe_parallel_size x model_parallel_size).")
    num_kv_heads: int = doc_field(0, "num_kv_heads, or num_attention_heads when unset.")
    head_dim: int = doc_field(0, "hidden_size / num_attention_heads.")
    intermediate_size: int = doc_field(0, "intermediate_size, or 4 x hidden_size for gelu when unset.")
    max_position_embeddings: int = doc_field(0, "max_position_embeddings, or seq_length when unset.")
    padded_vocab_size: int | None = doc_field(None, "vocab_size rounded up to make_vocab_size_divisible_by (None until the vocabulary is known).")
    train_micro_batch_size_per_gpu: int = doc_field(1, "Resolved micro batch (1 when no batch key is set).")
    gradient_accumulation_steps: int = doc_field(1, "Resolved accumulation steps.")
    train_batch_size: int = doc_field(1, "micro batch x accumulation x data parallel size.")
    lr_decay_iters: int = doc_field(1, "lr_decay_iters, or train_iters when unset.")
    warmup_iters: int = doc_field(0, "warmup_iters, or warmup x lr_decay_iters.")
    engine_zero_stage: int = doc_field(0, "The ZeRO stage DeepSpeed runs: zero_optimization.stage, or 0 for stage 1 or 2 on one fp32 rank without offload (nothing to partition; stage 0 skips ZeRO's flat fp32 copy of the weights and gradients). A resume of a one-rank fp32 checkpoint saved at stage 1 or 2 keeps that stage (the load plan decides; this value is not changed).")


@dataclass
class Config(LoraArgs, LauncherArgs, LoggingArgs, CheckpointArgs, TokenizerArgs, FinetuneArgs, DataArgs,
             TrainingArgs, OptimizerArgs, PrecisionArgs, ParallelArgs, ModelArgs):
    """The merged, validated configuration every part of neox_llama reads."""

    derived: Derived = field(default_factory=Derived, metadata={"derived": True})
    sources: dict[str, str] = field(default_factory=dict, metadata={"derived": True})
    raw: dict = field(default_factory=dict, metadata={"derived": True})
    invalid_keys: set[str] = field(default_factory=set, metadata={"derived": True})
