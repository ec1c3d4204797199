"""The weight-name table between Hugging Face ``LlamaForCausalLM`` and neox_llama's layer list.

One row per tensor kind; ``{i}`` is the Hugging Face block index, whose neox_llama layer index is i + 1.
"""

from __future__ import annotations

import torch

from neox_llama.model.args import LlamaArgs

BLOCK_TABLE: tuple[tuple[str, str], ...] = (
    ("model.layers.{i}.input_layernorm.weight", "input_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "attention.query.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "attention.query.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "attention.key.weight"),
    ("model.layers.{i}.self_attn.k_proj.bias", "attention.key.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "attention.value.weight"),
    ("model.layers.{i}.self_attn.v_proj.bias", "attention.value.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "attention.dense.weight"),
    ("model.layers.{i}.self_attn.o_proj.bias", "attention.dense.bias"),
    ("model.layers.{i}.post_attention_layernorm.weight", "post_attention_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "mlp.gate.weight"),
    ("model.layers.{i}.mlp.gate_proj.bias", "mlp.gate.bias"),
    ("model.layers.{i}.mlp.up_proj.weight", "mlp.up.weight"),
    ("model.layers.{i}.mlp.up_proj.bias", "mlp.up.bias"),
    ("model.layers.{i}.mlp.down_proj.weight", "mlp.down.weight"),
    ("model.layers.{i}.mlp.down_proj.bias", "mlp.down.bias"),
)
"""(Hugging Face name, neox_llama name inside a block)."""


def hf_to_ours(args: LlamaArgs) -> dict[str, str]:
    """Every Hugging Face tensor name of a model with ``args`` -> our parameter name."""
    n = args.num_layers
    table = {"model.embed_tokens.weight": "0.word_embeddings.weight", "model.norm.weight": f"{n + 1}.norm.weight"}
    if args.num_labels:  # a reward model: LlamaForSequenceClassification's score head
        table["score.weight"] = f"{n + 2}.score.weight"
    elif not args.tie_embeddings:
        table["lm_head.weight"] = f"{n + 2}.head.weight"
    for i in range(n):
        for hf, ours in BLOCK_TABLE:
            table[hf.format(i=i)] = f"{i + 1}.{ours}"
    return table


def hf_config_dict(args: LlamaArgs, true_vocab_size: int | None = None) -> dict:
    """``LlamaConfig`` keyword arguments describing the same model (vocabulary trimmed to ``true_vocab_size``)."""
    if args.norm != "rmsnorm" or args.pos_emb != "rotary" or args.activation != "swiglu" or args.rotary_pct != 1.0:
        raise ValueError("only Llama models (rmsnorm, rotary on every dimension, swiglu) have a Hugging Face Llama form")
    rope: dict = {"rope_type": "default", "rope_theta": args.rotary_emb_base}
    if args.rope_scaling:
        rope = {"rope_theta": args.rotary_emb_base,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in args.rope_scaling}}
    return {
        "vocab_size": true_vocab_size or args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.norm_epsilon,
        "rope_parameters": rope,
        "tie_word_embeddings": args.tie_embeddings and not args.num_labels,
        "attention_bias": args.use_bias_in_attn_linear,
        "mlp_bias": args.use_bias_in_mlp,
        "hidden_act": "silu",
        **({"num_labels": args.num_labels} if args.num_labels else {}),
    }


def expected_shape(args: LlamaArgs, name: str) -> tuple[int, ...]:
    """The full (un-sharded) shape of parameter ``name`` (inside its layer) of a model with ``args``."""
    h, hd, inter = args.hidden_size, args.head_dim, args.intermediate_size
    q, kv = args.num_attention_heads * hd, args.num_kv_heads * hd
    shapes = {
        "word_embeddings.weight": (args.vocab_size, h), "head.weight": (args.vocab_size, h), "norm.weight": (h,),
        "score.weight": (args.num_labels, h),
        "input_norm.weight": (h,), "post_attention_norm.weight": (h,),
        "attention.query.weight": (q, h), "attention.key.weight": (kv, h), "attention.value.weight": (kv, h),
        "attention.dense.weight": (h, q), "mlp.gate.weight": (inter, h), "mlp.up.weight": (inter, h),
        "mlp.down.weight": (h, inter), "attention.query.bias": (q,), "attention.key.bias": (kv,),
        "attention.value.bias": (kv,), "attention.dense.bias": (h,), "mlp.gate.bias": (inter,),
        "mlp.up.bias": (inter,), "mlp.down.bias": (h,),
    }
    return shapes[name]


@torch.no_grad()
def copy_into_hf(hf_model: torch.nn.Module, our_model: torch.nn.Module, args: LlamaArgs) -> None:
    """Copy our model's weights into a ``transformers.LlamaForCausalLM`` of the same shape, checking every name and
    shape (for the parity tests and the benchmarks, which compare the two models on the same weights)."""
    ours = dict(our_model.named_parameters())
    table = hf_to_ours(args)
    for hf_name, param in hf_model.named_parameters():
        our_name = table.get(hf_name)
        if our_name not in ours:
            raise ValueError(f"{hf_name}: no neox_llama tensor for it ({our_name or 'no entry in the name table'})")
        source = ours[our_name]
        if source.shape != param.shape:
            raise ValueError(f"{hf_name} has shape {tuple(param.shape)}, {our_name} has {tuple(source.shape)}")
        param.copy_(source)
