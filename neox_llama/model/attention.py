"""Causal self-attention with grouped-query heads, through torch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import LayerFactory
from neox_llama.model.kv_cache import KVCache
from neox_llama.model.rotary import RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    """Multi-head (num_kv_heads == heads), grouped-query or multi-query attention.

    Parameters: ``query`` [heads*head_dim, hidden], ``key``/``value`` [kv_heads*head_dim, hidden],
    ``dense`` [hidden, heads*head_dim] (Hugging Face q_proj, k_proj, v_proj, o_proj).
    """

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        tp = factory.tp_size
        self.head_dim = args.head_dim
        self.local_heads = args.num_attention_heads // tp
        self.local_kv_heads = args.num_kv_heads // tp
        bias = args.use_bias_in_attn_linear
        self.query = factory.column(args.hidden_size, args.num_attention_heads * args.head_dim, bias)
        self.key = factory.column(args.hidden_size, args.num_kv_heads * args.head_dim, bias)
        self.value = factory.column(args.hidden_size, args.num_kv_heads * args.head_dim, bias)
        self.dense = factory.row(args.num_attention_heads * args.head_dim, args.hidden_size, bias)
        self.dropout = args.attention_dropout
        self.document_attention = args.document_attention
        self.recompute = args.recompute_attention
        self.register_module("adapter", None)  # LLaMA-Adapter's gated prompt, when a run adds one (model/adapter.py)
        self.rotary = None
        if args.pos_emb == "rotary":
            scaling = dict(args.rope_scaling) if args.rope_scaling else None
            self.rotary = RotaryEmbedding(args.head_dim, args.rotary_emb_base, args.rotary_pct, scaling,
                                          context=args.max_position_embeddings)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.query(x).view(batch, seq, self.local_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v, mask = cache.append(k, v)
            # no mask: causal over a prompt, or (one new position, the last one) attention to every cached position
            out = self._core(q, k, v, mask, causal=mask is None and seq > 1)
        elif self.recompute and self.training and torch.is_grad_enabled():
            # Selective checkpointing: keep only q, k, v; the mask, scores and softmax are rebuilt in backward (the
            # dropout mask too: checkpoint replays the RNG state).
            out = checkpoint(self._masked_core, q, k, v, position_ids, use_reentrant=False)
        else:
            out = self._masked_core(q, k, v, position_ids)
        if self.adapter is not None:
            out = out + self.adapter(q, self.key, self.value, self.local_kv_heads)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, self.local_heads * self.head_dim))

    def _masked_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self._core(q, k, v, document_causal_mask(position_ids) if self.document_attention else None)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v over [batch, heads, seq, head_dim] (``causal`` by default when there is
        no mask)."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None if causal is None else causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.local_kv_heads != self.local_heads)


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask: causal, and only within the document (a new one starts at position 0)."""
    document = (position_ids == 0).cumsum(dim=-1)
    same = document[:, :, None] == document[:, None, :]
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]
