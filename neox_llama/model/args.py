"""The architecture numbers the layers need, taken from the validated config."""

from __future__ import annotations

from dataclasses import dataclass

from neox_llama.config.schema import Config

ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("rope_type", "factor"),
    "dynamic": ("rope_type", "factor"),
    "llama3": ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("rope_type", "factor", "original_max_position_embeddings", "attention_factor", "long_factor",
                 "short_factor"),
}
"""The rope_scaling keys each rule reads (the others are left out of the model's arguments and of config.json)."""


@dataclass(frozen=True)
class LlamaArgs:
    """Shape and numerics of a Llama model (a resolved view of the config's model keys)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    """Rows of the embedding: the padded vocabulary."""
    max_position_embeddings: int
    norm: str = "rmsnorm"
    norm_epsilon: float = 1e-5
    pos_emb: str = "rotary"
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    """Rotary scaling as (key, value) pairs, ``rope_type`` first, lists as tuples (hashable), or None."""
    activation: str = "swiglu"
    use_bias_in_attn_linear: bool = False
    use_bias_in_mlp: bool = False
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    seed: int = 1234
    document_attention: bool = False
    """Attend only within the document: documents start where position_ids restart at 0."""
    recompute_attention: bool = False
    """Selective activation checkpointing: recompute each attention core (mask, scores, softmax) in backward."""
    num_labels: int = 0
    """0: the head gives logits over the vocabulary; 1: a reward model's scalar score head (``score``)."""

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int | None = None) -> LlamaArgs:
        """Arguments of the model described by a resolved ``cfg``; ``vocab_size`` overrides the padded vocabulary."""
        d = cfg.derived
        vocab = vocab_size or d.padded_vocab_size
        if vocab is None:
            raise ValueError("the vocabulary size is unknown: set vocab_size or load the tokenizer first")
        scaling = None
        if cfg.rope_scaling is not None:
            rs = cfg.rope_scaling
            scaling = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in
                            ((k, getattr(rs, k)) for k in ROPE_KEYS[rs.rope_type]) if v is not None)
        return cls(
            num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
            num_kv_heads=d.num_kv_heads, head_dim=d.head_dim, intermediate_size=d.intermediate_size,
            vocab_size=vocab, max_position_embeddings=d.max_position_embeddings, norm=cfg.norm,
            norm_epsilon=cfg.rms_norm_epsilon if cfg.norm == "rmsnorm" else cfg.layernorm_epsilon,
            pos_emb=cfg.pos_emb, rotary_emb_base=cfg.rotary_emb_base, rotary_pct=cfg.rotary_pct,
            rope_scaling=scaling, activation=cfg.activation, use_bias_in_attn_linear=cfg.use_bias_in_attn_linear,
            use_bias_in_mlp=cfg.use_bias_in_mlp, tie_embeddings=not cfg.no_weight_tying,
            init_method_std=cfg.init_method_std, attention_dropout=cfg.attention_dropout,
            hidden_dropout=cfg.hidden_dropout, seed=cfg.seed,
            # packed instruction records restart their positions: attention stays within each record
            document_attention=cfg.reset_attention_mask or bool(cfg.sft_data_path and cfg.sft_packing),
            recompute_attention=cfg.checkpoint_activations and cfg.checkpoint_granularity == "selective",
            num_labels=1 if cfg.reward_head or cfg.preference_loss == "rm" else 0,
        )
