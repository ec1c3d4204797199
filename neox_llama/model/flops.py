"""Parameter counts and per-token training FLOPs, from the config alone (no weights needed).

FLOPs per token follow the formula torchtitan and nanoGPT use (see docs/architecture.md and the README):
``6 x (non-embedding parameters, lm head included) + 12 x layers x heads x head_dim x seq_length``,
which counts SwiGLU's third matrix and grouped-query attention's smaller key/value projections
through the parameter count, and ignores causal sparsity in the attention term.
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


def flops_per_token(cfg: Config, vocab_size: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at ``seq_length``."""
    n = count_parameters(cfg, vocab_size).non_embedding
    attention = 12 * cfg.num_layers * cfg.num_attention_heads * cfg.derived.head_dim * cfg.seq_length
    return 6 * n + attention
