"""Parameter counts and per-token training FLOPs, from the config alone (no weights needed).

FLOPs per token follow the formula torchtitan and nanoGPT use (see docs/architecture.md and the README):
``6 x (non-embedding parameters, lm head included) + 12 x layers x heads x head_dim x seq_length``,
which counts SwiGLU's third matrix and grouped-query attention's smaller key/value projections
through the parameter count, and ignores causal sparsity in the attention term. That is the model's FLOPs
(MFU); activation checkpointing's recomputation is counted apart (:func:`recompute_flops_per_token`, for HFU).
"""

from __future__ import annotations

from dataclasses import dataclass

from neox_llama.config.schema import Config


@dataclass
class ParameterCount:
    """Parameters of a model, by where they live."""

    embedding: int
    """Token embedding (plus learned positions)."""
    per_layer: int
    """One transformer block."""
    layers: int
    """All transformer blocks."""
    final_norm: int
    head: int
    """Output head; 0 when it shares the embedding matrix."""
    head_compute: int
    """Parameters the head multiplies with, tied or not (for FLOPs)."""

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.head

    @property
    def non_embedding(self) -> int:
        """Everything but the embedding lookup, the lm head's matrix included (the FLOPs convention)."""
        return self.layers + self.final_norm + self.head_compute


def count_parameters(cfg: Config, vocab_size: int | None = None) -> ParameterCount:
    """Count parameters for a resolved config; ``vocab_size`` defaults to the padded vocabulary."""
    d = cfg.derived
    vocab = vocab_size if vocab_size is not None else d.padded_vocab_size
    if vocab is None:
        raise ValueError("the vocabulary size is unknown (no vocab_size and no tokenizer loaded)")
    h, hd, inter = cfg.hidden_size, d.head_dim, d.intermediate_size
    q_out, kv_out = cfg.num_attention_heads * hd, d.num_kv_heads * hd
    norm = h if cfg.norm == "rmsnorm" else 2 * h
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if cfg.use_bias_in_attn_linear:
        attention += q_out + 2 * kv_out + h
    matrices = 3 if cfg.activation == "swiglu" else 2
    mlp = matrices * h * inter
    if cfg.use_bias_in_mlp:
        mlp += (matrices - 1) * inter + h
    per_layer = 2 * norm + attention + mlp
    embedding = vocab * h + (d.max_position_embeddings * h if cfg.pos_emb == "learned" else 0)
    head = vocab * h if cfg.no_weight_tying else 0
    return ParameterCount(embedding=embedding, per_layer=per_layer, layers=per_layer * cfg.num_layers,
                          final_norm=norm, head=head, head_compute=vocab * h)


@dataclass
class Trainable:
    """What a fine-tune trains: LoRA adapters on a frozen base, or the base minus its ``freeze`` patterns."""

    trainable: int
    """Parameters that get gradients and optimizer state (LoRA: only the adapters)."""
    total: int
    """Every parameter, adapters included."""
    frozen_compute: int
    """Frozen parameters that multiply activations (a frozen embedding lookup is not counted; a tied head is)."""

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)


def count_trainable(cfg: Config, vocab_size: int | None = None) -> Trainable:
    """Count from the model built on the meta device with the config's LoRA, Adapter or freeze applied (no memory
    used)."""
    from neox_llama.model.args import LlamaArgs
    from neox_llama.model.factory import SINGLE_DEVICE
    from neox_llama.model.llama import build_model
    from neox_llama.peft.freeze import apply_freeze
    from neox_llama.peft.methods import apply_peft, peft_settings

    args = LlamaArgs.from_config(cfg, vocab_size)
    model = build_model(args, device="meta", initialize=False)
    layers = {int(i): layer for i, layer in model.named_children()}
    settings = peft_settings(cfg)
    if settings is not None:
        apply_peft(layers, settings, SINGLE_DEVICE, args, cfg.seed)
    elif cfg.freeze:
        apply_freeze(layers, cfg.freeze, cfg.num_layers, tied=args.tie_embeddings)
    trainable = total = frozen_compute = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
        elif not name.startswith("0.") or (args.tie_embeddings and name == "0.word_embeddings.weight"):
            frozen_compute += param.numel()
    return Trainable(trainable, total, frozen_compute)


def flops_per_token(cfg: Config, vocab_size: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at ``seq_length``.

    A frozen matrix costs 4 FLOPs per parameter (forward, and the backward pass's input gradient), not 6:
    its weight gradient is not computed. LoRA adapters are counted like any trained matrix. An Adapter's prompt
    adds, per token and adapted block, attention over its ``adapter_prompt_length`` positions (12 x heads x
    head_dim x length, forward and backward); its gates, scales and biases are elementwise (not counted). Under
    Adapter (v1) the blocks below ``adapter_start_layer`` run forward only (2 FLOPs per parameter, attention 4x).
    """
    n = count_parameters(cfg, vocab_size).non_embedding
    attention = 12 * cfg.num_layers * cfg.num_attention_heads * cfg.derived.head_dim * cfg.seq_length
    if not cfg.lora_r and not cfg.freeze and cfg.peft_method == "lora":
        return 6 * n + attention
    counted = count_trainable(cfg, vocab_size)
    if cfg.peft_method != "lora":
        flops = 6 * n - 2 * counted.frozen_compute + 3 * _prompt_attention(cfg) + attention
        if cfg.peft_method == "adapter":  # blocks below the first prompt train nothing: no backward through them
            below = min(cfg.adapter_start_layer, cfg.num_layers)
            per_block = count_parameters(cfg, vocab_size).layers // cfg.num_layers
            flops -= below * (2 * per_block + 8 * cfg.num_attention_heads * cfg.derived.head_dim * cfg.seq_length)
        return flops
    adapters = counted.total - count_parameters(cfg, vocab_size).total
    return 6 * n - 2 * counted.frozen_compute + 6 * adapters + attention


def _prompt_attention(cfg: Config) -> int:
    """Forward FLOPs per token of the Adapter prompts' attention (scores and weighted sum over the prompt)."""
    blocks = max(0, cfg.num_layers - cfg.adapter_start_layer)
    return 4 * blocks * cfg.num_attention_heads * cfg.derived.head_dim * cfg.adapter_prompt_length


def recompute_flops_per_token(cfg: Config, vocab_size: int | None = None) -> int:
    """FLOPs per token that activation checkpointing adds by recomputing in backward (for HFU; MFU leaves them out).

    ``full``: one more forward of every transformer block (2 per block parameter, LoRA adapters included, and the
    attention scores' forward 4 x layers x heads x head_dim x seq_length); ``selective``: only the attention cores.
    """
    if not cfg.checkpoint_activations:
        return 0
    attention = 4 * cfg.num_layers * cfg.num_attention_heads * cfg.derived.head_dim * cfg.seq_length
    if cfg.checkpoint_granularity == "selective":
        return attention
    blocks = count_parameters(cfg, vocab_size).layers
    if cfg.peft_method != "lora":
        return 2 * blocks + _prompt_attention(cfg) + attention
    if cfg.lora_r:
        counted = count_trainable(cfg, vocab_size)
        blocks += counted.total - count_parameters(cfg, vocab_size).total - _head_adapters(cfg, vocab_size)
    return 2 * blocks + attention


def _head_adapters(cfg: Config, vocab_size: int | None) -> int:
    """Parameters of a LoRA adapter on the head (outside the blocks: not recomputed)."""
    if "head" not in cfg.lora_targets:
        return 0
    vocab = vocab_size if vocab_size is not None else cfg.derived.padded_vocab_size
    return cfg.lora_r * (cfg.hidden_size + vocab)
